"""Bytes each rank really holds in training, against the analytic figures: model state and activations.

Part "state":

For d = 1, 2, 4, 8 data-parallel gloo ranks, builds the Trainer on a small model, takes one step
(so the optimizer state exists) and counts the tensors rank 0 holds for its model shard: weights,
gradients (bucket padding excluded, reported apart), optimizer state and separate fp32 masters,
divided by the shard's parameters; for trainer.precision fp32 and bf16, with the all-reduce step and
the distributed optimizer. Reference: Megatron-LM's table (optim/memory.py), measured/analytic
printed per row.

Part "activations": the bytes one attention + MLP decoder layer saves for backward, measured with
saved-tensor hooks on the real block (models/activation_probe.py) for recompute none / selective /
full, fp32 and bf16, as rank 0 of tp = 1, 2, 4, 8 (the `fake` backend: collectives move no data,
every tensor has its real shape), with and without sequence parallelism. Reference: the formula
derived in trainer/memory_model.py (docs/memory.md); measured/derived printed per row, and the
figure in units of sbh (Korthikanti et al. 2022 count sbh(34 + 5as/h) for GPT-3's fp16 block).

Part "deepspeed": the same count for optim.backend=deepspeed at ZeRO stages 1-3 (every distinct
storage the engine keeps for the model: parameters or their ZeRO-3 partitions, gradients, the ZeRO
optimizer's fp32 partitions and gradient buffers, AdamW moments) beside the native steps, fp32, held
between steps, against: native 16 and 8 + 8/d; DeepSpeed stages 1-2: 4 + 12/d (weights, its fp32
copy of the partition and the moments; gradients are freed after the update); stage 3: 20/d (weights,
fp32 copy, gradient partition and moments, all partitioned).

    .venv/bin/python bench/memory.py [--part state activations deepspeed] [--worlds 1 2 4 8] [--precisions fp32 bf16]
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models.activation_probe import layer_saved_bytes
from models.config import ModelConfig
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from optim.memory import analytic_bytes_per_param, measured_state_bytes
from parallel_state.groups import AxisGroup
from tests.conftest import REPO_ROOT, tiny_overrides
from tests.multirank.harness import RankPool, fake_world
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.memory_model import LayerShape, layer_activation_bytes
from trainer.trainer import Trainer


def held_bytes(overrides: list[str]) -> dict:
    """On one rank: its measured state bytes after one step."""
    world, rank = dist.get_world_size(), dist.get_rank()
    with contextlib.redirect_stdout(io.StringIO()):  # the trainer's start-up log
        trainer = Trainer(compose(overrides), env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank,
                                                             local_world_size=world))
        trainer.train_step()
    held = measured_state_bytes(trainer.optim_step)
    return {"per_param": held.per_param, "params": held.params, "padding": held.padding}


# A Llama-like layer small enough for a CPU: h 512, 8 heads (d 64), 2 K/V heads, f 1408, s 1024, b 1.
ACTIVATION_MODEL = {"vocab_size": 256, "hidden_size": 512, "num_layers": 2, "num_heads": 8, "num_kv_heads": 2,
                    "ffn_hidden_size": 1408}
ACTIVATION_SEQ, ACTIVATION_MICRO = 1024, 1


def activation_table(tps: list[int], precisions: list[str]) -> None:
    """Measured vs derived bytes one layer saves for backward, per TP rank (part "activations")."""
    cfg0 = ModelConfig(**ACTIVATION_MODEL)
    s, b, h = ACTIVATION_SEQ, ACTIVATION_MICRO, cfg0.hidden_size
    print(f"activations of one layer: s={s} b={b} h={h} a={cfg0.num_heads} kv={cfg0.kv_heads} "
          f"f={cfg0.resolved_ffn_hidden_size()}")
    print(f"{'tp':>3} {'sp':>3} {'dtype':>5} {'recompute':>9} {'measured MiB':>12} {'derived MiB':>11} "
          f"{'ratio':>7} {'x sbh (bytes)':>13}")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    for tp in tps:
        with fake_world(0, tp) if tp > 1 else contextlib.nullcontext():
            group = AxisGroup("tp", dist.group.WORLD, tuple(range(tp)), 0) if tp > 1 else AxisGroup.single("tp")
            for sp in ([False, True] if tp > 1 else [False]):
                par = ParallelContext(tp=TPContext(group, sp))
                for precision in precisions:
                    dtype = dtypes["bf16" if precision != "fp32" else "fp32"]
                    for recompute in ("none", "selective", "full"):
                        cfg = ModelConfig(**ACTIVATION_MODEL, recompute=recompute)
                        measured = layer_saved_bytes(cfg, 0, b, s, par=par, dtype=dtype)
                        derived = layer_activation_bytes(LayerShape.of(cfg, s, b, tp, sp, dtype.itemsize), recompute)
                        print(f"{tp:>3} {'on' if sp else 'off':>3} {precision:>5} {recompute:>9} "
                              f"{measured / 2**20:>12.3f} {derived / 2**20:>11.3f} {measured / derived:>7.4f} "
                              f"{measured / (s * b * h):>13.2f}")


def _tensors_in(obj, depth: int = 2):
    """Tensors an object holds in its attributes, lists, tuples and dicts (to `depth` levels)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth > 0 and isinstance(obj, (list, tuple)):
        for item in obj:
            yield from _tensors_in(item, depth - 1)
    elif depth > 0 and isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors_in(item, depth - 1)


def held_deepspeed_bytes(overrides: list[str]) -> dict:
    """On one rank, after one step of the DeepSpeed engine: the distinct storages it keeps for the model
    (parameters or their ZeRO-3 partitions, gradients, the ZeRO optimizer's fp32 partitions, gradient
    buffers and AdamW moments), per parameter of the whole model."""
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.join(REPO_ROOT, ".cache", "torch_extensions"))
    world, rank = dist.get_world_size(), dist.get_rank()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        trainer = Trainer(compose(overrides), env=RuntimeEnv(rank=rank, world_size=world, local_rank=rank,
                                                             local_world_size=world))
        trainer.train_step()
    step = trainer.optim_step
    zero = step.engine.optimizer
    tensors = []
    for p in trainer.model.parameters():
        tensors += [getattr(p, "ds_tensor", p), p.grad] if hasattr(p, "ds_tensor") else [p, p.grad]
    for state in zero.optimizer.state.values():
        tensors += [t for key, t in state.items() if torch.is_tensor(t) and key != "step"]
    for group in zero.optimizer.param_groups:
        tensors += [t for q in group["params"] for t in (q, q.grad)]
    for value in vars(zero).values():
        tensors += list(_tensors_in(value))
    storages = {}
    for t in tensors:
        if t is not None and t.numel() > 0 and t.device.type != "meta":
            storages.setdefault(t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
    params = trainer.full_model.num_parameters()
    return {"per_param": sum(storages.values()) / params}


def deepspeed_table(worlds: list[int]) -> None:
    """DeepSpeed's per-rank bytes per parameter beside the native steps' (part "deepspeed"; fp32)."""
    # Between steps (after one): foldtron keeps its fp32 gradient buckets (4), DeepSpeed frees the
    # gradients after the update at stages 1-2 and keeps a gradient partition at stage 3; DeepSpeed
    # keeps an fp32 copy of its parameter partition beside fp32 weights (4/d) and the moments (8/d).
    print(f"{'d':>3} {'engine':>28} {'measured B/param':>17} {'analytic':>9}   (held between steps, fp32)")
    with tempfile.TemporaryDirectory() as tmp:
        for world in worlds:
            pool = RankPool(world, timeout_s=900)
            try:
                run = os.path.join(tmp, f"ds{world}")
                base = tiny_overrides(_Path(run), run_dir=os.path.join(run, "run"), steps=3) + [
                    "trainer.save_final=false", "data.micro_batch_size=1", f"data.global_batch_size={world}"]
                for name, extra, analytic in (
                        ("native all-reduce", ["optim.distributed=false"], 16.0),
                        ("native distributed (ZeRO-1)", ["optim.distributed=true"], 8 + 8 / world),
                        ("deepspeed stage 1", ["optim.backend=deepspeed", "optim.deepspeed.stage=1"], 4 + 12 / world),
                        ("deepspeed stage 2", ["optim.backend=deepspeed", "optim.deepspeed.stage=2"], 4 + 12 / world),
                        ("deepspeed stage 3", ["optim.backend=deepspeed", "optim.deepspeed.stage=3"], 20 / world)):
                    fn = held_bytes if name.startswith("native") else held_deepspeed_bytes
                    rank0 = pool.run(fn, base + extra)[0]
                    print(f"{world:>3} {name:>28} {rank0['per_param']:>17.3f} {analytic:>9.3f}")
            finally:
                pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", nargs="+", choices=["state", "activations", "deepspeed"],
                        default=["state", "activations", "deepspeed"])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    args = parser.parse_args()
    if "activations" in args.part:
        activation_table(args.worlds, args.precisions)
    if "state" in args.part:
        state_table(args.worlds, args.precisions)
    if "deepspeed" in args.part:
        deepspeed_table([w for w in args.worlds if w > 1])


def state_table(worlds: list[int], precisions: list[str]) -> None:
    """Measured vs analytic bytes of model state per parameter on rank 0 (part "state")."""
    args = argparse.Namespace(worlds=worlds, precisions=precisions)
    print(f"{'d':>3} {'precision':>9} {'optimizer':>12} {'measured B/param':>17} {'analytic':>9} {'ratio':>7} "
          f"{'padding B':>10}")
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            pool = RankPool(world, timeout_s=900)
            try:
                for precision in args.precisions:
                    for distributed in (False, True):
                        run = os.path.join(tmp, f"d{world}-{precision}-{distributed}")
                        overrides = tiny_overrides(_Path(run), run_dir=os.path.join(run, "run"), steps=3) + [
                            f"optim.distributed={str(distributed).lower()}", "trainer.save_final=false",
                            f"trainer.precision={precision}", "data.micro_batch_size=1",
                            f"data.global_batch_size={world}"]
                        rank0 = pool.run(held_bytes, overrides)[0]
                        analytic = analytic_bytes_per_param(precision, distributed, world)
                        name = "distributed" if distributed else "all-reduce"
                        print(f"{world:>3} {precision:>9} {name:>12} {rank0['per_param']:>17.3f} {analytic:>9.3f} "
                              f"{rank0['per_param'] / analytic:>7.4f} {rank0['padding']:>10}")
            finally:
                pool.close()


class _Path(str):
    """tiny_overrides takes a pathlib-like directory (it joins with `/`)."""

    def __truediv__(self, other: str) -> str:
        return os.path.join(self, other)


if __name__ == "__main__":
    main()
