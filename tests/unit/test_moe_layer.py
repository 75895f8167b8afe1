"""MoELayer in one process against an obviously-correct dense MoE: a Python loop over tokens and choices.

The reference re-derives routing per token from the layer's own weights with plain Python
sorting, runs every token through each chosen expert's SwiGLU, weights and sums; aux losses are
the docs/moe.md formulas on whole-batch statistics. Outputs and gradients (input, router, experts,
shared experts) must match.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.init import materialize
from moe import AuxLossScale, MoEConfig, MoEContext, MoELayer
from moe.metrics import step_metrics
from parallel_state.groups import AxisGroup
from parallel_state.params import param_meta

HIDDEN, BATCH, SEQ = 16, 2, 6


def build_layer(cfg: MoEConfig, seed: int = 3, ctx: MoEContext | None = None,
                dtype: torch.dtype = torch.float32) -> MoELayer:
    with torch.device("meta"):
        layer = MoELayer(cfg, HIDDEN, init_std=0.3, output_init_std=0.2, ctx=ctx)
    return materialize(layer, seed=seed, dtype=dtype)


def _swiglu(x, w1, w3, w2):
    return w2 @ (F.silu(w1 @ x) * (w3 @ x))


def reference_route(logits: torch.Tensor, cfg: MoEConfig, bias: torch.Tensor):
    """(chosen experts, their weights) for one token's logits [E], by the docs/moe.md rules."""
    num_experts = cfg.num_experts
    if cfg.router == "blockffn":
        r = torch.relu(logits)
        rn = r / torch.sqrt((r * r).mean() + 1e-6)
        return [e for e in range(num_experts) if r[e] > 0], [rn[e] for e in range(num_experts) if r[e] > 0]
    scores = torch.softmax(logits, 0) if cfg.score_function == "softmax" else torch.sigmoid(logits)
    sel = [float(scores[e].detach()) + float(bias[e]) for e in range(num_experts)]
    allowed = list(range(num_experts))
    if cfg.n_group is not None:
        size = num_experts // cfg.n_group
        group_score = [sum(sorted(sel[g * size:(g + 1) * size], reverse=True)[:2]) for g in range(cfg.n_group)]
        kept = sorted(range(cfg.n_group), key=lambda g: -group_score[g])[:cfg.topk_group]
        allowed = [e for e in allowed if e // size in kept]
    chosen = sorted(allowed, key=lambda e: -sel[e])[:cfg.topk]
    if cfg.score_function == "sigmoid":
        total = sum(scores[e] for e in chosen)
        return chosen, [scores[e] / total for e in chosen]
    if cfg.topk_then_softmax:
        w = torch.softmax(torch.stack([logits[e] for e in chosen]), 0)
        return chosen, list(w)
    return chosen, [scores[e] for e in chosen]


def reference_drop(slots: list[tuple[int, int, int, float]], cfg: MoEConfig, num_tokens: int) -> set:
    """Kept (token, choice) pairs among slots (token, choice, expert, weight) under the capacity."""
    k = cfg.num_experts if cfg.router == "blockffn" else cfg.topk
    capacity = math.ceil(num_tokens * k / cfg.num_experts * cfg.capacity_factor)
    kept = set()
    for e in range(cfg.num_experts):
        mine = [s for s in slots if s[2] == e]  # already in token, choice order
        if cfg.drop_policy == "probs":
            mine = sorted(mine, key=lambda s: -s[3])  # stable: earlier slot first among equals
        kept |= {(s[0], s[1]) for s in mine[:capacity]}
    return kept


def dense_reference(layer: MoELayer, x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [B, T, H], the aux term added to the loss: scale * tokens * sum of coeff * loss)."""
    cfg, router = layer.cfg, layer.router
    tokens = x.reshape(-1, x.shape[-1])
    n = tokens.shape[0]
    logits = tokens @ router.weight.t()
    routes = [reference_route(logits[t], cfg, router.expert_bias) for t in range(n)]
    if cfg.router == "blockffn":
        routes = [(c, [w * router.norm_weight[e] for e, w in zip(c, ws)]) for c, ws in routes]
    slots = [(t, j, e, float(torch.as_tensor(w).detach())) for t, (c, ws) in enumerate(routes) for j, (e, w) in enumerate(zip(c, ws))]
    kept = reference_drop(slots, cfg, n) if cfg.capacity_factor is not None else {(s[0], s[1]) for s in slots}
    ex = layer.experts
    outs = []
    for t in range(n):
        y = torch.zeros(x.shape[-1], dtype=x.dtype)
        for j, (e, w) in enumerate(zip(*routes[t])):
            if (t, j) in kept:
                y = y + w * _swiglu(tokens[t], ex.w1[str(e)], ex.w3[str(e)], ex.w2[str(e)])
        if layer.shared is not None:
            y = y + _swiglu(tokens[t], layer.shared.w1, layer.shared.w3, layer.shared.w2)
        outs.append(y)
    aux = torch.zeros((), dtype=x.dtype)
    num_experts, k = cfg.num_experts, cfg.topk
    if cfg.score_function == "softmax":
        probs = torch.softmax(logits, -1)
    else:
        s = torch.sigmoid(logits)
        probs = s / s.sum(-1, keepdim=True)
    # f_e counts each token's plain top-k of the unbiased scores over all experts, whatever the
    # aux-free bias and the group limit made the token compute.
    chosen = [sorted(range(num_experts), key=lambda e, t=t: -float(probs[t, e].detach()))[:k] for t in range(n)]

    def balance(token_ids):
        f = [sum(chosen[t].count(e) for t in token_ids) / (len(token_ids) * k) for e in range(num_experts)]
        p = [probs[token_ids, e].mean() for e in range(num_experts)]
        return num_experts * sum(fe * pe for fe, pe in zip(f, p))

    if cfg.aux_loss_coeff:
        aux = aux + cfg.aux_loss_coeff * balance(list(range(n)))
    if cfg.seq_aux_loss_coeff:
        seq = x.shape[1]
        per_seq = [balance(list(range(b * seq, (b + 1) * seq))) for b in range(x.shape[0])]
        aux = aux + cfg.seq_aux_loss_coeff * sum(per_seq) / len(per_seq)
    if cfg.z_loss_coeff:
        aux = aux + cfg.z_loss_coeff * (torch.logsumexp(logits, -1) ** 2).mean()
    return torch.stack(outs).view_as(x), scale * n * aux


CASES = {
    "softmax_top2": {},
    "topk_then_softmax": {"topk_then_softmax": True},
    "sigmoid_grouped_biased": {"num_experts": 8, "score_function": "sigmoid", "n_group": 4, "topk_group": 2,
                               "aux_free_bias_rate": 0.01},
    "aux_losses_and_shared": {"aux_loss_coeff": 0.1, "seq_aux_loss_coeff": 0.05, "z_loss_coeff": 0.01,
                              "num_shared_experts": 2, "shared_ffn_hidden_size": 4},
    "sigmoid_aux": {"score_function": "sigmoid", "aux_loss_coeff": 0.1, "seq_aux_loss_coeff": 0.1},
    "sigmoid_grouped_biased_aux": {"num_experts": 8, "score_function": "sigmoid", "n_group": 4, "topk_group": 2,
                                   "aux_free_bias_rate": 0.01, "aux_loss_coeff": 0.1, "seq_aux_loss_coeff": 0.1},
    "softmax_grouped_aux": {"num_experts": 8, "n_group": 4, "topk_group": 1, "aux_loss_coeff": 0.1,
                            "seq_aux_loss_coeff": 0.1},
    "blockffn": {"router": "blockffn", "z_loss_coeff": 0.01},
    "capacity_probs": {"capacity_factor": 0.6, "drop_policy": "probs"},
    "capacity_position_padded": {"capacity_factor": 0.6, "drop_policy": "position", "pad_to_capacity": True},
    "blockffn_capacity": {"router": "blockffn", "capacity_factor": 0.5},
    "allgather": {"dispatcher": "allgather", "aux_loss_coeff": 0.1},
    "allgather_capacity_padded": {"dispatcher": "allgather", "capacity_factor": 0.6, "pad_to_capacity": True},
    "loop_gemm": {"grouped_gemm": "loop"},
    "grouped_mm": {"grouped_gemm": "grouped_mm"},
}


@pytest.mark.parametrize("name", list(CASES))
def test_layer_matches_dense_reference(name):
    """In float64 (tight tolerance) except the grouped_mm case, which CPU runs in float32 only."""
    cfg = MoEConfig(**{"num_experts": 4, "topk": 2, "ffn_hidden_size": 8, **CASES[name]})
    dtype = torch.float32 if cfg.grouped_gemm == "grouped_mm" else torch.float64
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    scale = AuxLossScale(0.37)
    layer = build_layer(cfg, ctx=MoEContext(aux_loss_scale=scale), dtype=dtype)
    if cfg.aux_free_bias_rate:
        layer.router.expert_bias.copy_(torch.linspace(-0.05, 0.05, cfg.num_experts))
    if cfg.router == "blockffn":  # a non-trivial gain, so its gradient is checked too
        with torch.no_grad():
            layer.router.norm_weight.copy_(torch.linspace(0.5, 1.5, cfg.num_experts))
    torch.manual_seed(0)
    x = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype)
    grad_out = torch.randn(BATCH, SEQ, HIDDEN, dtype=dtype)
    params = dict(layer.named_parameters())

    x1 = x.clone().requires_grad_()
    y = layer(x1)
    grads = torch.autograd.grad((y * grad_out).sum(), [x1, *params.values()], allow_unused=True)

    x2 = x.clone().requires_grad_()
    y_ref, aux_ref = dense_reference(layer, x2, scale.value)
    ref_grads = torch.autograd.grad((y_ref * grad_out).sum() + aux_ref, [x2, *params.values()], allow_unused=True)

    torch.testing.assert_close(y, y_ref, **tol)
    for pname, g, g_ref in zip(["input", *params], grads, ref_grads):
        if g_ref is None:  # an expert no token reached
            assert g is None or g.abs().max() == 0, pname
            continue
        torch.testing.assert_close(g, g_ref, **tol, msg=lambda m, p=pname: f"{p}: {m}")
    if cfg.capacity_factor is not None:
        assert layer.last_dropped_slots > 0  # the case really drops
    if cfg.aux_loss_coeff and cfg.n_group is not None:  # the case really routes off the plain top-k
        routing = layer.router(x.reshape(-1, HIDDEN))
        assert (routing.expert.sort(-1).values != routing.aux_expert.sort(-1).values).any()


def test_expert_params_are_marked_and_named_by_global_id():
    layer = build_layer(MoEConfig(num_experts=4, topk=2, ffn_hidden_size=8, num_shared_experts=1))
    expert_names = {n for n, p in layer.named_parameters() if param_meta(p).expert}
    assert expert_names == {f"experts.{w}.{e}" for w in ("w1", "w2", "w3") for e in range(4)}
    assert not param_meta(layer.router.weight).expert
    assert not param_meta(layer.shared.w1).expert


def test_zero_tokens_and_unused_experts():
    cfg = MoEConfig(num_experts=4, topk=1, ffn_hidden_size=8)
    layer = build_layer(cfg)
    assert layer(torch.zeros(0, 3, HIDDEN)).shape == (0, 3, HIDDEN)
    with torch.no_grad():  # every token prefers expert 2
        layer.router.weight.zero_()
        layer.router.weight[2] = 1.0
    x = torch.ones(1, 4, HIDDEN)
    y_ref, _ = dense_reference(layer, x, 1.0)
    torch.testing.assert_close(layer(x), y_ref)


def test_grouped_mm_path_is_taken_when_requested_on_cpu_fp32():
    layer = build_layer(MoEConfig(num_experts=4, topk=2, ffn_hidden_size=8, grouped_gemm="grouped_mm"))
    assert layer.experts.uses_grouped_mm(torch.zeros(1, HIDDEN))
    odd = build_layer(MoEConfig(num_experts=4, topk=2, ffn_hidden_size=6, grouped_gemm="grouped_mm"))
    with pytest.raises(RuntimeError, match="grouped_gemm=grouped_mm"):
        odd(torch.zeros(1, 2, HIDDEN))


def test_flops_per_token_counts_router_routed_and_shared():
    cfg = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=8, num_shared_experts=1, shared_ffn_hidden_size=4)
    layer = build_layer(cfg)
    assert layer.flops_per_token(seq_len=6) == 6 * (HIDDEN * 4 + 3 * HIDDEN * (2 * 8 + 4))


def test_step_metrics_follow_the_documented_formulas_and_run_the_bias_step():
    """One process: moe.metrics.step_metrics against the docs/moe.md definitions, computed from
    the layers' own per-microbatch state; the aux-free bias moves and the counts restart."""
    cfg = MoEConfig(num_experts=4, topk=2, ffn_hidden_size=8, score_function="sigmoid", aux_loss_coeff=0.1,
                    z_loss_coeff=0.01, aux_free_bias_rate=0.01, capacity_factor=0.6)
    layers = [build_layer(cfg, seed=s) for s in (3, 4)]
    torch.manual_seed(0)
    for layer in layers:
        for _ in range(2):  # two microbatches; the aux sums and drops kept are the last one's
            layer(torch.randn(BATCH, SEQ, HIDDEN))
    counts = [layer.router.tokens_per_expert.clone() for layer in layers]
    tokens = sum(layer.last_num_tokens for layer in layers)
    want = {f"moe/{name}": sum(float(layer.last_aux_sums[name]) for layer in layers) / tokens
            for name in ("load_balancing", "z_loss")}
    want["moe/seq_load_balancing"] = 0.0
    want["moe/load_imbalance"] = sum(float(c.max() / c.mean()) for c in counts) / len(counts)
    want["moe/dropped_fraction"] = sum(layer.last_dropped_slots for layer in layers) / (tokens * cfg.topk)
    want.update({f"moe/tokens_per_expert/{e}": float(sum(c[e] for c in counts)) for e in range(4)})

    stage, world = AxisGroup.single("tp_dp_cp"), AxisGroup.single("world")
    metrics = step_metrics(layers, cfg, stage, world, max_logged_experts=4)

    assert metrics == pytest.approx(want, rel=1e-12)
    assert want["moe/dropped_fraction"] > 0
    for layer, c in zip(layers, counts):
        torch.testing.assert_close(layer.router.expert_bias, (0.01 * torch.sign(c.mean() - c)).float())
        assert layer.router.tokens_per_expert.sum() == 0
    assert not any(k.startswith("moe/tokens_per_expert/") for k in step_metrics(layers, cfg, stage, world, 3))
