"""Layout parity: every parallel layout trains like one process (docs/architecture.md, "Layout invariance").

The real Trainer runs three steps from the same seed and data on one process and on the layout
under test. Per step, the losses match, and the gradients each rank hands to the optimizer (after
the DP, TP, PP and EP reductions and the global-norm clipping), assembled from every rank's slices,
match the one-process gradients, fp32, relative tolerance 1e-5 (see assert_grad_close). LAYOUTS
covers TP (with and without SP), DP, the GLA, ParaRNN and MLA mixers under TP, CP (ring and all-to-all),
pipelines (1F1B, interleaved, tied embeddings, an explicit split), MoE folding and the ladder residual.
"""
from __future__ import annotations

import re

import pytest
import torch
import torch.distributed as dist

from parallel_state.params import param_meta
from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

STEPS = 3
# Per-tensor bound after step 1. Adam's first updates are ~lr * sign(g), so rounding-level gradient
# differences move entries whose gradient is near zero by up to lr; a rarely routed expert sees that
# most. Measured over the whole matrix: step 1 <= 5e-7, steps 2-3 <= 2.4e-5. A real bug is off by O(1).
LATER_STEPS_REL = 1e-4
# A vocabulary no tp divides, so the padded vocabulary shards and the loss masking are exercised.
ODD_VOCAB = ["model.vocab_size=4099"]


def global_name(name: str) -> str:
    """The one-process name of a parameter: pipeline chunks ("chunks.1.layers.5...") hold global
    layer indices, so dropping the chunk prefix gives it."""
    return re.sub(r"^chunks\.\d+\.", "", name)


def train_and_capture(overrides: list[str], env: RuntimeEnv | None = None) -> dict:
    """Run STEPS steps; return each step's loss and the named gradients handed to the optimizer."""
    trainer = Trainer(compose(overrides), env=env)
    grads: list[dict[str, torch.Tensor]] = []
    optimizer_step = trainer.optimizer.step
    params = {global_name(name): p for name, p in trainer.model.named_parameters()}

    def capturing_step(*args, **kwargs):
        grads.append({name: p.grad.clone() for name, p in params.items()})
        return optimizer_step(*args, **kwargs)

    trainer.optimizer.step = capturing_step
    metrics = [trainer.train_step() for _ in range(STEPS)]
    shards = {name: param_meta(p).shard for name, p in params.items()}
    padded = {name: param_meta(p).unpadded for name, p in params.items() if param_meta(p).unpadded}
    ps = trainer.ps
    return {"losses": [m["loss"] for m in metrics], "grad_norms": [m["grad_norm"] for m in metrics], "grads": grads, "shards": shards, "padded": padded,
            "tp": (ps.tp.rank, ps.tp.size), "dp": (ps.dp.rank, ps.dp.size), "cp": (ps.cp.rank, ps.cp.size),
            "pp": (ps.pp.rank, ps.pp.size),
            "comm": trainer.comm_stats.summary()}


def on_rank(overrides: list[str]) -> dict:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    return train_and_capture(overrides, env)


def assembled(results: list[dict], step: int, name: str) -> torch.Tensor:
    """The full gradient of `name` from every rank that holds a piece of it (padding rows dropped).

    Whatever the layout (TP or ETP shards, pipeline stages, experts on EP ranks), a parameter is
    either replicated or split into `count` slices: every replica of a slice must hold a
    bit-identical gradient (DP x CP, EDP and TP replicas never drift), and the slices concatenate.
    """
    holders = [r for r in results if name in r["grads"][step]]
    assert holders, f"no rank holds {name}"
    layout = {r["shards"][name] and r["shards"][name][::2] for r in holders}
    assert len(layout) == 1, f"{name}: ranks disagree on its sharding {layout}"
    pieces: dict[int, torch.Tensor] = {}
    for r in holders:
        shard, grad = r["shards"][name], r["grads"][step][name]
        index = 0 if shard is None else shard[1]
        if index in pieces:
            assert torch.equal(pieces[index], grad), f"replicas of {name} (slice {index}) differ"
        else:
            pieces[index] = grad
    shard = holders[0]["shards"][name]
    count = 1 if shard is None else shard[2]
    assert sorted(pieces) == list(range(count)), f"{name}: slices {sorted(pieces)} of {count}"
    full = pieces[0] if count == 1 else torch.cat([pieces[i] for i in range(count)], shard[0])
    if name in holders[0]["padded"]:
        dim, size = holders[0]["padded"][name]
        assert (full.narrow(dim, size, full.shape[dim] - size) == 0).all(), f"padding of {name} got gradient"
        full = full.narrow(dim, 0, size)
    return full


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, what: str, elementwise: bool,
                      rel: float = 1e-5) -> None:
    """|actual - expected| <= rel * |expected| for the tensor (L2 norms), and with `elementwise` also
    each element within `rel` of itself or of the tensor's largest entry.

    Step 1 (same weights) is checked element by element. Later steps start from weights one Adam
    update apart by fp32 rounding, and Adam's first updates are ~lr * sign(g): an entry whose
    gradient is rounding noise can move by lr in either direction. So later steps are compared
    per tensor; a real bug (a missing or doubled reduction) is off by O(1) either way.
    """
    error = (actual.double() - expected.double()).norm().item()
    assert error <= rel * expected.double().norm().item() + 1e-12, (
        f"{what}: relative error {error / max(expected.double().norm().item(), 1e-30):.3g} > {rel}")
    if elementwise:
        scale = expected.abs().max().item()
        torch.testing.assert_close(actual, expected, rtol=rel, atol=rel * scale, msg=lambda m: f"{what}: {m}")


# A tiny MoE: 4 experts, top-2, every balance loss on, a shared expert.
MOE = ["model.channel_mixers=[moe]", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
       "model.moe.aux_loss_coeff=0.01", "model.moe.seq_aux_loss_coeff=0.01", "model.moe.z_loss_coeff=0.001",
       "model.moe.num_shared_experts=1"]

# The ladder residual on every layer (docs/ladder.md): deferred TP reductions, same model as one process.
LADDER = ["model.residual=ladder"]

# Multi-head latent attention (docs/mla.md): V narrower than K, query and key/value latents.
MLA = ["model.token_mixers=[mla]", "model.mla.q_lora_rank=16", "model.mla.kv_lora_rank=16",
       "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=6"]
YARN = ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4", "model.rope_scaling.mscale_all_dim=1",
        "model.rope_scaling.original_max_position_embeddings=16"]

# (tp, sequence_parallel, cp, dp, micro batch size, extra overrides); pp and vpp go in the overrides.
LAYOUTS = [
    (1, False, 1, 2, 2, []),
    (1, False, 1, 2, 1, []),
    (1, False, 1, 4, 1, []),
    (2, False, 1, 1, 2, ODD_VOCAB),
    (2, True, 1, 1, 2, []),
    (2, False, 1, 2, 1, []),
    (2, True, 1, 2, 2, ODD_VOCAB),
    (4, False, 1, 1, 2, ODD_VOCAB),  # 2 KV heads < tp = 4: K/V replicated
    (4, True, 1, 1, 2, []),
    (4, False, 1, 2, 2, []),
    (4, True, 1, 2, 1, ODD_VOCAB),
    # The other token mixers shard too: GLA heads, ParaRNN state channels (no comm in the recurrence).
    (2, True, 1, 1, 2, ["model.token_mixers=[gla,attention]"]),
    (2, False, 1, 2, 1, ["model.token_mixers=[pararnn_gru]", "model.pararnn.newton_iterations=6"]),
    (2, True, 1, 1, 2, ["model.token_mixers=[pararnn_lstm]", "model.pararnn.newton_iterations=6"]),
    # MLA: heads over TP with the down-projections and latent norms replicated (grads summed over TP);
    # CP with V narrower than K on the ring and through the all-to-all; a pipeline with YaRN; a
    # DeepSeek-V3-like MoE (sigmoid, aux-free bias, group-limited routing, shared expert, dense first layer).
    (2, False, 1, 1, 2, MLA),
    (2, True, 1, 1, 2, MLA),
    (1, False, 2, 1, 2, [*MLA, "parallel.cp_comm=ring"]),
    (1, False, 2, 1, 2, [*MLA, "parallel.cp_comm=a2a"]),
    (1, False, 1, 1, 1, [*MLA, *YARN, "parallel.pp=2", "model.num_layers=4"]),
    (2, True, 1, 1, 2, [*MLA, *MOE, "model.moe.score_function=sigmoid", "model.moe.n_group=2",
                        "model.moe.topk_group=1", "model.moe.aux_free_bias_rate=0.01",
                        "model.moe.first_k_dense_layers=1", "parallel.ep=2", "parallel.etp=1"]),
    # Context parallelism: zigzag chunks, ring or all-to-all attention, loss over the global token count.
    (1, False, 2, 1, 2, []),
    (1, False, 4, 1, 2, []),
    (1, False, 2, 1, 2, ["parallel.cp_comm=a2a"]),
    (2, True, 2, 1, 2, ["parallel.cp_comm=ring"]),
    (2, False, 2, 1, 1, ["parallel.cp_comm=a2a", "model.num_kv_heads=4"]),
    (1, False, 2, 2, 1, ODD_VOCAB),
    (2, True, 2, 2, 1, []),
    # Pipelines (the tiny model has 4 layers here): 1F1B and interleaved, with TP and DP, tied embeddings.
    (1, False, 1, 1, 1, ["parallel.pp=2", "model.num_layers=4"]),
    (1, False, 1, 1, 1, ["parallel.pp=4", "model.num_layers=4"]),
    (1, False, 1, 1, 1, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"]),
    (2, True, 1, 1, 1, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4"]),
    (1, False, 1, 2, 1, ["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4", "model.tie_embeddings=true"]),
    (2, True, 1, 2, 1, ["parallel.pp=2", "model.num_layers=4", "model.tie_embeddings=true"]),
    (1, False, 2, 1, 1, ["parallel.pp=2", "model.num_layers=4"]),
    (1, False, 1, 1, 1, ["parallel.pp=2", "model.num_layers=4", "parallel.pipeline_layers=[1,3]"]),
    # MoE with parallel folding (dropless, aux losses on): the expert grid (etp, ep, edp) over the same ranks.
    (2, False, 1, 1, 2, [*MOE, "parallel.ep=2", "parallel.etp=1"]),
    (2, True, 1, 1, 2, [*MOE, "parallel.ep=2", "parallel.etp=1"]),
    (1, False, 1, 4, 1, [*MOE, "data.micro_batch_size=1", "parallel.ep=4"]),
    (2, True, 1, 2, 2, [*MOE, "parallel.ep=4", "parallel.etp=1"]),
    (2, False, 1, 2, 2, [*MOE, "parallel.ep=2", "parallel.etp=2"]),
    (2, True, 1, 2, 2, [*MOE, "model.moe.dispatcher=allgather", "parallel.ep=4", "parallel.etp=1"]),
    (1, False, 1, 2, 2, [*MOE, "parallel.pp=2", "model.num_layers=4", "parallel.ep=2"]),
    (1, False, 2, 1, 2, [*MOE, "parallel.ep=2"]),
    # Sigmoid router with the aux-free bias and group-limited routing: the balance losses count the
    # plain top-k, not the computed experts, and their counts are summed over the TP (SP) ranks.
    (2, True, 1, 1, 2, [*MOE, "model.moe.score_function=sigmoid", "model.moe.n_group=2", "model.moe.topk_group=1",
                        "model.moe.aux_free_bias_rate=0.01", "parallel.ep=2", "parallel.etp=1"]),
    # Ladder residual: the row-parallel reductions (all-reduce, or reduce-scatter under SP) and the
    # input-gradient reductions are in flight while the next module computes; the pipeline stage
    # boundary is a declared ladder restart; a MoE mixer completes its own output.
    (2, False, 1, 1, 2, [*LADDER, "model.token_mixers=[attention,gla]"]),
    (2, True, 1, 1, 2, [*LADDER, "model.token_mixers=[pararnn_gru,attention]", "model.pararnn.newton_iterations=6"]),
    (2, True, 1, 1, 1, [*LADDER, "parallel.pp=2", "model.num_layers=4", "model.ladder_restarts=[2]"]),
    (2, False, 1, 1, 2, [*MOE, *LADDER, "parallel.ep=2", "parallel.etp=1"]),
    (2, True, 2, 1, 2, [*LADDER, "model.ladder_layers=1", "parallel.cp_comm=ring"]),
    # Activation recomputation (docs/recompute.md): the recomputed forward repeats the SP collectives,
    # the pipeline stage's layers (block: first layer of each stage) and the MoE token exchange.
    (2, True, 1, 1, 2, ["model.recompute=selective"]),
    (1, False, 1, 1, 1, ["parallel.pp=2", "model.num_layers=4", "model.recompute=full",
                         "model.recompute_method=block", "model.recompute_layers=1"]),
    (2, True, 1, 1, 2, [*MOE, "parallel.ep=2", "parallel.etp=1", "model.recompute=full"]),
]


def layout_id(tp, sp, cp, dp, micro, extra) -> str:
    parts = [f"tp{tp}" + ("-sp" if sp else ""), f"cp{cp}" if cp > 1 else "", f"dp{dp}", f"mb{micro}"]
    parts += [o.split("=")[1].strip("[]").replace(",", "+") for o in extra if "mixers" in o or "vocab" in o
              or "cp_comm" in o or "dispatcher" in o or "score_function" in o or "residual" in o
              or "recompute" in o]
    parts += [o.replace("parallel.", "").replace("=", "") for o in extra if o.startswith(("parallel.ep", "parallel.etp"))]
    parts += [o.split("=")[0].split(".")[1] + o.split("=")[1].replace(",", "+").strip("[]") for o in extra
              if o.startswith(("parallel.pp", "parallel.vpp", "parallel.pipeline_layers", "model.tie"))]
    return "-".join(p for p in parts if p)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """One-process runs, one per distinct model (by extra overrides and micro batch)."""
    cache: dict = {}
    root = tmp_path_factory.mktemp("parity")

    def get(extra: list[str]) -> tuple[list[str], dict]:
        key = tuple(extra)
        if key not in cache:
            base = tiny_overrides(root, run_dir=root / f"one{len(cache)}", steps=10)
            overrides = base + ["model.dropout=0.0", "trainer.save_final=false"] + extra
            cache[key] = (overrides, train_and_capture(overrides))
        return cache[key]

    return get


@pytest.mark.parametrize("tp,sp,cp,dp,micro,extra", LAYOUTS, ids=[layout_id(*layout) for layout in LAYOUTS])
def test_layout_matches_one_process(tmp_path, rank_pools, references, tp, sp, cp, dp, micro, extra):
    base, reference = references([o for o in extra if not o.startswith("parallel.")])
    pp = next((int(o.split("=")[1]) for o in extra if o.startswith("parallel.pp=")), 1)
    world = tp * cp * dp * pp
    overrides = base + [f"trainer.run_dir={tmp_path / 'layout'}", f"data.micro_batch_size={micro}",
                        f"parallel.tp={tp}", f"parallel.cp={cp}", f"parallel.sequence_parallel={str(sp).lower()}",
                        *[o for o in extra if o.startswith("parallel.")]]
    results = rank_pools.get(world).run(on_rank, overrides)
    assert sorted(r["tp"] + r["cp"] + r["dp"] + r["pp"] for r in results) == sorted(
        (t, tp, c, cp, d, dp, q, pp) for t in range(tp) for c in range(cp) for d in range(dp) for q in range(pp))
    for r in results:  # every rank reports the global loss
        assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    names = set(reference["grads"][0])
    held = set().union(*(r["grads"][0] for r in results))
    if "output.weight" in held and "output.weight" not in names:  # embeddings tied over pipeline stages
        for step in range(STEPS):
            assert torch.equal(assembled(results, step, "output.weight"), assembled(results, step, "embedding.weight"))
        held.discard("output.weight")
    assert held == names
    for step in range(STEPS):
        for name in names:
            # Step 1 starts from the same weights: fp32 rounding of the reductions only (1e-5, element
            # by element). Later steps start from weights one Adam update apart (see assert_grad_close).
            assert_grad_close(assembled(results, step, name), reference["grads"][step][name],
                              f"step {step + 1}, grad of {name}", elementwise=step == 0,
                              rel=1e-5 if step == 0 else LATER_STEPS_REL)
    if tp > 1:  # the TP collectives were counted (their volume is checked in test_tp_layers)
        tp_ops = {key for key in results[0]["comm"] if key.startswith("comm/tp/")}
        assert "comm/tp/all_reduce_bytes" in tp_ops and (not sp or "comm/tp/all_gather_bytes" in tp_ops), tp_ops
