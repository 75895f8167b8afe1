"""Sample from a trained checkpoint: greedy or temperature / top-p decoding with a KV cache
(attention), a latent cache (MLA) or the recurrent state (GLA, ParaRNN), on one process or on tp
ranks; MLA models can decode with TPLA (docs/tpla.md).

    .venv/bin/python launch/generate.py runs/quickstart/<stamp> --prompt "ROMEO:" --max-new-tokens 50
    .venv/bin/python launch/generate.py --run-dir runs/quickstart/<stamp> --temperature 0.8 --top-p 0.9
    .venv/bin/torchrun --nproc-per-node=2 launch/generate.py runs/mla_quickstart/<stamp> --tpla   # tp = g = 2
    .venv/bin/torchrun --nproc-per-node=4 launch/generate.py CKPT --tpla --tpla-transform hadamard
    .venv/bin/torchrun --nproc-per-node=2 launch/generate.py CKPT --tpla --tpla-transform pca --tpla-latent-norm full

CHECKPOINT is a run directory (its newest complete checkpoint is used) or one checkpoint directory
(`.../checkpoints/step_000200`). The model's config and weights come from it (global tensors, so
a run trained in any layout loads on one process or on tp ranks). The prompt is read once
(prefill) into the caches, then each new token is one call on one position. With --tpla the
prefill is exact MLA and each decode step is TPLA with g = tp latent slices, optionally after a
Hadamard or PCA transform of the latent (PCA calibrates on the first tokens of the run's training
split). Ladder-residual models decode the same way as standard ones (without --tpla): their
deferred TP reductions overlap the next module at every step (bench/ladder.py measures it).
Decoding runs without sequence or context parallelism.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from omegaconf import OmegaConf

from models import build_model
from models.inference.check import check_decode
from models.inference.config import LATENT_NORMS, LATENT_TRANSFORMS, DecodeConfig, SamplingConfig, TPLAConfig
from models.inference.generation import (  # noqa: F401 - Generation, full_vocab_logits: this module's API
    Generation,
    LatentDecoder,
    full_vocab_logits,
    generate,
    generate_uncached,
)
from models.layers.tensor_parallel import TPContext
from models.model import DecoderModel
from models.parallel_context import ParallelContext
from parallel_state.groups import AxisGroup
from trainer.checkpoint import CONFIG_FILE, META_FILE, find_latest_checkpoint
from trainer.checkpointer import Checkpointer
from trainer.config import Config, to_config
from trainer.data.tokenizer import load_tokenizer


def greedy_generate(model: DecoderModel, prompt: torch.Tensor, max_new_tokens: int,
                    caches: dict | None = None) -> Generation:
    """Decode `max_new_tokens` greedily after `prompt` [B, P], reusing every layer's cache."""
    return generate(model, prompt, max_new_tokens, SamplingConfig(), caches)


def greedy_generate_uncached(model: DecoderModel, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
    """The reference: the whole sequence through the model again for every new token."""
    return generate_uncached(model, prompt, max_new_tokens, SamplingConfig())


def checkpoint_path(path: str) -> str:
    """The checkpoint to load: `path` itself when it is one (holds META_FILE), else the newest complete
    checkpoint of the run directory `path`."""
    if os.path.isfile(os.path.join(path, META_FILE)):
        return path
    found = find_latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is neither a checkpoint (a directory with {META_FILE}) nor a run directory "
                                f"holding one (checkpoints/step_*/ with {META_FILE})")
    return found[0]


def load_model(run_dir: str, tp: AxisGroup | None = None, device: str = "cpu") -> tuple[DecoderModel, Config]:
    """This rank's shard of the model of a checkpoint (`run_dir`: a run directory, whose newest complete
    checkpoint is read, or one checkpoint directory), in eval mode, and the run's config.
    Checkpoints hold global tensors, so any tp loads them."""
    path = checkpoint_path(run_dir)
    cfg = to_config(OmegaConf.load(os.path.join(path, CONFIG_FILE)))
    tp = tp if tp is not None else AxisGroup.single("tp")
    par = ParallelContext(tp=TPContext(tp, sequence_parallel=False))
    model = build_model(cfg.model, seed=cfg.seed, device=device, par=par)
    run_dir = os.path.dirname(os.path.dirname(path))
    Checkpointer(run_dir, rank=tp.ranks[tp.rank], world_size=tp.size, layout=f"generate-tp{tp.size}",
                 keep_last=0).load(path, model, None, field="--run-dir")
    return model.eval(), cfg


def calibration_tokens(cfg: Config, count: int) -> torch.Tensor:
    """The first `count` tokens of the run's training split as [B, seq_len] windows (PCA calibration)."""
    from trainer.data.prepare import prepare

    stream = prepare(cfg.data).tokens("train")
    seq_len = min(cfg.data.seq_len, count)
    rows = max(1, count // seq_len)
    return torch.from_numpy(stream[:rows * seq_len].astype("int64")).view(rows, seq_len)


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, DecodeConfig]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", help="a run directory or one checkpoint directory")
    parser.add_argument("--run-dir", help="a training run directory (holds checkpoints/); same as CHECKPOINT")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else sample at this temperature")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (with --temperature > 0)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (the same on every rank)")
    parser.add_argument("--tpla", action="store_true", help="decode MLA layers with TPLA, g = tp latent slices")
    parser.add_argument("--tpla-degree", type=int, default=None,
                        help="g on one process (simulates g ranks); under tp it must equal tp")
    parser.add_argument("--tpla-transform", default="none", choices=LATENT_TRANSFORMS,
                        help="orthogonal transform of the latent before slicing")
    parser.add_argument("--tpla-calibration-tokens", type=int, default=2048, help="PCA calibration tokens")
    parser.add_argument("--tpla-latent-norm", default="slice", choices=LATENT_NORMS,
                        help="normalise a decode token's latent per slice (the paper) or by the whole latent")
    args = parser.parse_args(argv)
    if (args.checkpoint is None) == (args.run_dir is None):
        parser.error("give the checkpoint either as CHECKPOINT or as --run-dir (exactly one)")
    cfg = DecodeConfig(max_new_tokens=args.max_new_tokens,
                       sampling=SamplingConfig(temperature=args.temperature, top_p=args.top_p, seed=args.seed),
                       tpla=TPLAConfig(enabled=args.tpla, degree=args.tpla_degree, transform=args.tpla_transform,
                                       calibration_tokens=args.tpla_calibration_tokens,
                                       latent_norm=args.tpla_latent_norm))
    return args, cfg


def main(argv: list[str] | None = None) -> None:
    args, decode = parse_args(argv)
    tp = AxisGroup.single("tp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: every rank is one TP rank of the model
        import torch.distributed as dist
        dist.init_process_group("gloo")
        tp = AxisGroup("tp", dist.group.WORLD, tuple(range(world)), dist.get_rank())
    source = args.checkpoint or args.run_dir
    path = checkpoint_path(source)
    cfg = to_config(OmegaConf.load(os.path.join(path, CONFIG_FILE)))
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    try:  # every rank checks the same things, before any weight is loaded
        check_decode(cfg.model, decode, prompt.shape[1], tp.size)
    except ValueError as e:
        sys.exit(f"foldtron: error: {e}")
    model, cfg = load_model(path, tp)
    calibration = None
    if decode.tpla.enabled and decode.tpla.transform == "pca":
        calibration = calibration_tokens(cfg, decode.tpla.calibration_tokens)
    decoder = LatentDecoder(model, decode.tpla, calibration)
    caches = decoder.caches(prompt.shape[1] + decode.max_new_tokens)
    out = generate(model, prompt, decode.max_new_tokens, decode.sampling, caches)
    if tp.rank == 0:
        print(tokenizer.decode(out.tokens[0].tolist()))


if __name__ == "__main__":
    main()
