"""GLA ops and layer against a float64 step-by-step recurrence and other independent references."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F

from kernels.dispatch import BACKEND_ENV, KernelBackendWarning, KernelsConfig, select_backend
from kernels.gla import chunk_gla, chunk_gla_torch, fused_recurrent_gla, naive_recurrent_gla
from models import build_model
from models.config import GLAConfig, ModelConfig
from models.init import collect_init_specs
from models.layers.gla import GatedLinearAttention

SEQ_LENS = (1, 63, 64, 65, 200)


def _inputs(seq_len, batch=2, heads=2, key_dim=8, value_dim=12, dtype=torch.float64, seed=0, gate_scale=3.0):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype)
    k = torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype)
    v = torch.randn(batch, seq_len, heads, value_dim, generator=gen, dtype=dtype)
    g = F.logsigmoid(gate_scale * torch.randn(batch, seq_len, heads, key_dim, generator=gen, dtype=dtype))
    h0 = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype)
    do = torch.randn(batch, seq_len, heads, value_dim, generator=gen, dtype=dtype)
    dht = torch.randn(batch, heads, key_dim, value_dim, generator=gen, dtype=dtype)
    return q, k, v, g, h0, do, dht


def _outputs_and_grads(op, q, k, v, g, h0, do, dht, use_h0, use_final, dtype):
    """Run `op` on copies cast to `dtype`; return o, final state and the grads of q, k, v, g (, h0)."""
    leaves = [x.detach().to(dtype).requires_grad_() for x in (q, k, v, g)]
    initial = h0.detach().to(dtype).requires_grad_() if use_h0 else None
    o, final = op(*leaves, initial_state=initial, output_final_state=use_final)
    assert (final is not None) == use_final
    loss = (o.double() * do).sum()
    if use_final:
        loss = loss + (final.double() * dht).sum()
    grads = torch.autograd.grad(loss, leaves + ([initial] if use_h0 else []))
    return [o, final] + list(grads)


def _assert_close(actual, expected, tol):
    for i, (a, e) in enumerate(zip(actual, expected)):
        if e is None:
            assert a is None, f"output {i}"
            continue
        scale = e.abs().max().item() + 1.0
        err = (a.double() - e.double()).abs().max().item()
        assert err <= tol * scale, f"output {i}: max abs error {err:.3g} > {tol} * {scale:.3g}"


@pytest.mark.parametrize("seq_len", SEQ_LENS)
@pytest.mark.parametrize("use_h0,use_final", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("op_name", ["chunk", "fused_recurrent"])
def test_ops_match_float64_recurrence(seq_len, use_h0, use_final, op_name):
    op = {"chunk": chunk_gla, "fused_recurrent": fused_recurrent_gla}[op_name]
    data = _inputs(seq_len)
    reference = _outputs_and_grads(naive_recurrent_gla, *data, use_h0, use_final, torch.float64)
    # In float64 the chunk algebra itself must be exact to rounding; in fp32 it accumulates in fp32.
    _assert_close(_outputs_and_grads(op, *data, use_h0, use_final, torch.float64), reference, 1e-10)
    _assert_close(_outputs_and_grads(op, *data, use_h0, use_final, torch.float32), reference, 2e-5)


def test_chunk_output_dtype_and_state_dtype():
    q, k, v, g, h0, _, _ = _inputs(70, dtype=torch.float32)
    o, final = chunk_gla(q.bfloat16(), k.bfloat16(), v.bfloat16(), g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.bfloat16 and o.shape == v.shape
    assert final.dtype == torch.float32 and final.shape == h0.shape


def test_extreme_gates_stay_finite_and_exact():
    # Decay of up to 60 nats per step: a one-shot exp(-cumsum) factorisation would overflow fp32.
    q, k, v, _, h0, _, _ = _inputs(150, dtype=torch.float32)
    g = -60.0 * torch.rand(q.shape, generator=torch.Generator().manual_seed(1))
    g[:, ::7] = 0.0  # and some steps with no decay at all
    o, final = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_ref, final_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), initial_state=h0.double(),
                                           output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    _assert_close([o, final], [o_ref, final_ref], 1e-5)


@pytest.mark.parametrize("use_final", [False, True])
def test_gate_gradient_identity(use_final):
    """dg_t = sum_{s>=t} (q_s dq_s - k_s dk_s), plus S_T dS_T at the last step when S_T is an output."""
    q, k, v, g, h0, do, dht = _inputs(100)
    _, final, dq, dk, _, dg, _ = _outputs_and_grads(chunk_gla, q, k, v, g, h0, do, dht, True, use_final,
                                                        torch.float64)
    d_cumulative = q * dq - k * dk
    if use_final:
        d_cumulative[:, -1] += torch.einsum("bhkv,bhkv->bhk", final.detach(), dht)
    expected = d_cumulative.flip(1).cumsum(1).flip(1)
    torch.testing.assert_close(dg, expected, rtol=1e-9, atol=1e-9)


def test_zero_gate_is_causal_linear_attention():
    q, k, v, _, _, _, _ = _inputs(90)
    o, _ = chunk_gla(q, k, v, torch.zeros_like(q), scale=0.3)
    # o_t = scale * sum_{s<=t} (q_t . k_s) v_s, per batch and head.
    scores = torch.einsum("bthk,bshk->bhts", q, k).tril()
    expected = 0.3 * torch.einsum("bhts,bshv->bthv", scores, v)
    torch.testing.assert_close(o, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("split", [1, 64, 77])
def test_split_sequence_with_state_passing_equals_one_call(split):
    q, k, v, g, h0, _, _ = _inputs(150)
    o_full, final_full = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_a, state = chunk_gla(q[:, :split], k[:, :split], v[:, :split], g[:, :split], initial_state=h0,
                           output_final_state=True)
    o_b, final = chunk_gla(q[:, split:], k[:, split:], v[:, split:], g[:, split:], initial_state=state,
                           output_final_state=True)
    torch.testing.assert_close(torch.cat([o_a, o_b], dim=1), o_full, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(final, final_full, rtol=1e-10, atol=1e-10)


def test_chunk_rejects_mismatched_shapes():
    q, k, v, g, _, _, _ = _inputs(10)
    with pytest.raises(ValueError, match="initial_state"):
        chunk_gla_torch(q, k, v, g, initial_state=torch.zeros(1, 2, 3, 4, dtype=q.dtype))
    with pytest.raises(ValueError, match="v must be"):
        chunk_gla_torch(q, k, v[:, :5], g)


# --- dispatcher ------------------------------------------------------------------------------------

def test_dispatch_auto_and_env_override(monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    assert select_backend(cpu) == "torch"
    assert select_backend(cpu, KernelsConfig(backend="torch")) == "torch"
    monkeypatch.setenv(BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match=BACKEND_ENV):
        select_backend(cpu)
    with pytest.raises(ValueError, match="kernels.on_missing"):
        monkeypatch.setenv(BACKEND_ENV, "torch")
        select_backend(cpu, KernelsConfig(on_missing="ignore"))


def test_dispatch_missing_triton_warns_or_fails(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv(BACKEND_ENV, "triton")
    cpu = torch.device("cpu")
    with pytest.warns(KernelBackendWarning, match="torch reference"):
        assert select_backend(cpu, op_name="chunk_gla") == "torch"
    with pytest.raises(RuntimeError, match="chunk_gla: Triton backend requested"):
        select_backend(cpu, KernelsConfig(on_missing="fail"), op_name="chunk_gla")
    # An op without a Triton kernel says so rather than silently running torch.
    q, k, v, g, _, _, _ = _inputs(3)
    with pytest.warns(KernelBackendWarning, match="no Triton kernel"):
        fused_recurrent_gla(q, k, v, g)
    monkeypatch.setenv(BACKEND_ENV, "auto")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert select_backend(cpu) == "torch"


# --- layer ----------------------------------------------------------------------------------------

def _model_cfg(**gla) -> ModelConfig:
    return ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, token_mixers=["gla"],
                       gla=GLAConfig(**gla))


def _layer(cfg: ModelConfig, seed: int = 0) -> GatedLinearAttention:
    layer = GatedLinearAttention(cfg)
    specs = layer.init_specs()
    assert set(specs) == {name for name, _ in layer.named_parameters()}
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in layer.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    return layer


def test_layer_shapes_and_paper_gate():
    cfg = _model_cfg()
    layer = _layer(cfg)
    assert (layer.num_heads, layer.key_dim, layer.value_dim) == (4, 16, 32)
    assert layer.gk_proj[0].out_features == 16
    x = torch.randn(2, 70, 32)
    y = layer(x)
    assert y.shape == x.shape
    # Gate as the paper: logsigmoid(x W1 W2 + b) / 16 (checked by recomputing it by hand).
    gate = F.logsigmoid(x @ layer.gk_proj[0].weight.T @ layer.gk_proj[1].weight.T + layer.gk_proj[1].bias) / 16
    assert (gate <= 0).all()
    assert layer.flops_per_token(256) > 0


def test_layer_chunk_equals_fused_recurrent():
    x = torch.randn(2, 70, 32)
    chunk = _layer(_model_cfg(mode="chunk"))
    recurrent = _layer(_model_cfg(mode="fused_recurrent"))
    torch.testing.assert_close(chunk(x), recurrent(x), rtol=1e-4, atol=1e-5)


def test_layer_heads_are_independent_for_tensor_parallelism():
    """Two half-layers (heads 0-1 and 2-3, weights sliced as TP would) sum to the full layer."""
    full = _layer(_model_cfg())
    x = torch.randn(2, 40, 32)
    halves = []
    for index in range(2):
        half = GatedLinearAttention(_model_cfg(num_heads=2, expand_k=0.25, expand_v=0.5))
        rows_k = slice(index * 8, (index + 1) * 8)
        rows_v = slice(index * 16, (index + 1) * 16)
        with torch.no_grad():
            half.q_proj.weight.copy_(full.q_proj.weight[rows_k])
            half.k_proj.weight.copy_(full.k_proj.weight[rows_k])
            half.v_proj.weight.copy_(full.v_proj.weight[rows_v])
            half.g_proj.weight.copy_(full.g_proj.weight[rows_v])
            half.gk_proj[0].weight.copy_(full.gk_proj[0].weight)  # replicated low-rank input
            half.gk_proj[1].weight.copy_(full.gk_proj[1].weight[rows_k])
            half.gk_proj[1].bias.copy_(full.gk_proj[1].bias[rows_k])
            half.g_norm_weight.copy_(full.g_norm_weight[index * 2:(index + 1) * 2])
            half.o_proj.weight.copy_(full.o_proj.weight[:, rows_v])
        halves.append(half(x))
    torch.testing.assert_close(halves[0] + halves[1], full(x), rtol=1e-5, atol=1e-6)


def test_check_rejects_indivisible_heads_and_unknown_modes():
    from models.check import check
    from parallel_state import ConfigError, ParallelConfig, Topology

    with pytest.raises(ConfigError, match=r"model\.gla\.expand_k=.*not divisible by the 3 GLA heads"):
        check(_model_cfg(num_heads=3), ParallelConfig(), Topology(1))
    with pytest.raises(ConfigError, match=r"model\.gla\.mode='parallel': must be one of"):
        check(_model_cfg(mode="parallel"), ParallelConfig(), Topology(1))


def test_hybrid_model_builds_and_trains_one_step():
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=4, num_kv_heads=2,
                      token_mixers=["gla", "gla", "gla", "attention"])
    model = build_model(cfg, seed=3)
    kinds = [type(block.token_mixer).__name__ for block in model.layers.values()]
    assert kinds == ["GatedLinearAttention"] * 3 + ["Attention"]
    assert set(collect_init_specs(model)) >= {n for n, _ in model.named_parameters()}
    tokens = torch.randint(0, 64, (2, 33))
    logits = model(tokens[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, 64), tokens[:, 1:].reshape(-1))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # Same seed, same weights: initialisation depends only on (seed, name).
    again = build_model(cfg, seed=3)
    for (name, a), (_, b) in zip(model.named_parameters(), again.named_parameters()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("experiment", ["gla_quickstart", "gla_hybrid_quickstart"])
def test_experiments_compose_and_validate(experiment):
    from trainer.config import compose
    from trainer.validation import validate

    cfg = compose([f"+experiment={experiment}"])
    validate(cfg, world_size=1)
    assert "gla" in cfg.model.token_mixers
    assert cfg.model.gla.num_heads == 4


def test_model_kernels_config_reaches_the_gla_op(monkeypatch):
    """model.kernels.backend=triton with on_missing=fail must fail on CPU (no silent fallback)."""
    from kernels.dispatch import BACKEND_ENV, KernelsConfig
    from models import ModelConfig, build_model

    monkeypatch.delenv(BACKEND_ENV, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = ModelConfig(vocab_size=32, hidden_size=32, num_layers=1, num_heads=4, token_mixers=["gla"],
                      kernels=KernelsConfig(backend="triton", on_missing="fail"))
    cfg.gla.num_heads = 4
    model = build_model(cfg, seed=0)
    with pytest.raises(Exception, match="triton"):
        model(torch.zeros(1, 8, dtype=torch.long))
