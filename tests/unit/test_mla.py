"""Multi-head latent attention (models/layers/mla.py) on one process: the expanded training form
against the absorbed decode form and against a plain float64 reference, YaRN, the K/V-width
generalisation of the CP block kernels, bf16 parameters, and the model built with `mla` layers."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from models import build_model
from models.config import MLAConfig, ModelConfig, RopeScalingConfig
from models.decode_cache import DecodeCache
from models.init import materialize
from models.layers.context_parallel import (
    equal_width_sdpa,
    fused_block_attention,
    fused_block_attention_backward,
    fused_block_available,
    ring_attention,
    torch_block_attention,
    torch_block_attention_backward,
)
from models.layers.mla import MultiHeadLatentAttention
from models.layers.rope import RotaryEmbedding, apply_rotary, yarn_inverse_frequencies, yarn_mscale
from parallel_state.groups import AxisGroup

SEED = 5
B, T, HIDDEN, HEADS = 2, 12, 32, 4
MLA_OVERRIDES = ["model.token_mixers=[mla]", "model.mla.q_lora_rank=16", "model.mla.kv_lora_rank=12",
                 "model.mla.qk_nope_head_dim=8", "model.mla.qk_rope_head_dim=4", "model.mla.v_head_dim=6"]
YARN = RopeScalingConfig(type="yarn", factor=8.0, mscale=0.7, mscale_all_dim=1.0, original_max_position_embeddings=8)


def mla_cfg(q_lora_rank: int = 16, rope_scaling: RopeScalingConfig | None = None, **overrides) -> ModelConfig:
    """Heads of 8 (nope) + 4 (rope) query/key channels and 6 value channels: V narrower than K."""
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)
    return ModelConfig(vocab_size=64, hidden_size=HIDDEN, num_heads=HEADS, token_mixers=["mla"], mla=mla,
                       rope_scaling=rope_scaling or RopeScalingConfig(), max_position_embeddings=64, **overrides)


def build_mla(cfg: ModelConfig, dtype=torch.float64) -> MultiHeadLatentAttention:
    with torch.device("meta"):
        layer = MultiHeadLatentAttention(cfg)
    return materialize(layer, SEED, dtype=dtype)


def inputs(dtype=torch.float64, seed=0) -> torch.Tensor:
    return torch.randn(B, T, HIDDEN, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def plain_mla(layer: MultiHeadLatentAttention, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The definition written out head by head with an explicit softmax (float64 reference)."""
    if layer.q_lora_rank > 0:
        c_q = layer.q_norm(x @ layer.wq_down.weight.T)
        q_all = c_q @ layer.wq_up.weight.T
    else:
        q_all = x @ layer.wq.weight.T
    c_kv, k_pe = (x @ layer.wkv_down.weight.T).split([layer.kv_lora_rank, layer.rope_dim], -1)
    c = layer.kv_norm(c_kv)
    cos, sin = layer.rope(positions)
    k_pe = apply_rotary(k_pe.unsqueeze(1), cos, sin)[:, 0]
    kv_all = c @ layer.wkv_up.weight.T
    heads = []
    for h in range(layer.num_heads):
        q = q_all[..., h * layer.qk_dim:(h + 1) * layer.qk_dim]
        q_nope, q_pe = q[..., :layer.nope_dim], apply_rotary(q[..., layer.nope_dim:].unsqueeze(1), cos, sin)[:, 0]
        kv = kv_all[..., h * (layer.nope_dim + layer.v_dim):(h + 1) * (layer.nope_dim + layer.v_dim)]
        k_nope, v = kv[..., :layer.nope_dim], kv[..., layer.nope_dim:]
        scores = (q_nope @ k_nope.transpose(-1, -2) + q_pe @ k_pe.transpose(-1, -2)) * layer.softmax_scale
        causal = positions[:, None, :] <= positions[:, :, None]
        heads.append(torch.softmax(scores.masked_fill(~causal, float("-inf")), -1) @ v)
    return torch.cat(heads, -1) @ layer.wo.weight.T


@pytest.mark.parametrize("q_lora_rank", [16, 0], ids=["q-latent", "q-direct"])
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
def test_naive_equals_absorbed_and_the_plain_definition(q_lora_rank, yarn):
    """fp64, 1e-10: the two forms differ only in the order of the sums."""
    layer = build_mla(mla_cfg(q_lora_rank, YARN if yarn else None))
    x = inputs()
    positions = torch.arange(T)[None]
    zigzag = torch.cat([torch.arange(3), torch.arange(9, 12), torch.arange(3, 9)])[None]  # any order works
    naive = layer(x)
    torch.testing.assert_close(layer.absorbed(x), naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(plain_mla(layer, x, positions), naive, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer(x, positions), naive, rtol=0, atol=1e-12)
    permuted = x[:, zigzag[0]]
    torch.testing.assert_close(layer(permuted, zigzag), naive[:, zigzag[0]], rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.absorbed(permuted, zigzag), naive[:, zigzag[0]], rtol=0, atol=1e-10)


def test_gradients_match_the_plain_definition():
    layer = build_mla(mla_cfg())
    x = inputs().requires_grad_()
    dout = inputs(seed=1)
    got = torch.autograd.grad(layer(x), [x, *layer.parameters()], dout)
    want = torch.autograd.grad(plain_mla(layer, x, torch.arange(T)[None]), [x, *layer.parameters()], dout)
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_parameter_names_shapes_and_flops():
    layer = build_mla(mla_cfg())
    shapes = {name: tuple(p.shape) for name, p in layer.named_parameters()}
    assert shapes == {"wq_down.weight": (16, HIDDEN), "q_norm.weight": (16,), "wq_up.weight": (HEADS * 12, 16),
                      "wkv_down.weight": (12 + 4, HIDDEN), "kv_norm.weight": (12,),
                      "wkv_up.weight": (HEADS * (8 + 6), 12), "wo.weight": (HIDDEN, HEADS * 6)}
    direct = build_mla(mla_cfg(q_lora_rank=0))
    assert "wq.weight" in dict(direct.named_parameters()) and not hasattr(direct, "wq_down")
    params = HIDDEN * 16 + 16 * 48 + HIDDEN * 16 + 12 * 56 + 24 * HIDDEN
    assert layer.flops_per_token(T) == 3 * (2 * params + 2 * T * HEADS * (12 + 6))


def test_yarn_scales_and_frequencies():
    """m(s, a) = 0.1 a ln s + 1; fast pairs keep their frequency, slow ones are divided by the factor."""
    assert yarn_mscale(1.0, 5.0) == 1.0 and yarn_mscale(40.0, 1.0) == pytest.approx(1.3688879)
    scaling = RopeScalingConfig(type="yarn", factor=40.0, original_max_position_embeddings=4096)
    plain = RotaryEmbedding(64, 10000.0).inv_freq
    yarn = yarn_inverse_frequencies(64, 10000.0, scaling)
    assert torch.equal(yarn[:10], plain[:10])  # more than beta_fast=32 turns over 4096 positions
    torch.testing.assert_close(yarn[-4:], plain[-4:] / 40.0)
    assert ((yarn <= plain * (1 + 1e-6)) & (yarn >= plain / 40.0 * (1 - 1e-6))).all()  # fp32 rounding
    layer = build_mla(mla_cfg(rope_scaling=YARN))
    assert layer.softmax_scale == pytest.approx(12**-0.5 * yarn_mscale(8.0, 1.0) ** 2)
    cos, _ = layer.rope(torch.zeros(1, 1, dtype=torch.long))
    torch.testing.assert_close(cos, torch.full_like(cos, yarn_mscale(8.0, 0.7) / yarn_mscale(8.0, 1.0)))


def test_bf16_parameters_keep_the_input_dtype():
    """With bf16 parameters and input the output is bf16 and close to the fp32 layer."""
    layer32, layer16 = build_mla(mla_cfg(), torch.float32), build_mla(mla_cfg(), torch.bfloat16)
    x = inputs(torch.float32)
    out16 = layer16(x.bfloat16().requires_grad_())
    assert out16.dtype == torch.bfloat16 and layer16.absorbed(x.bfloat16()).dtype == torch.bfloat16
    out16.float().sum().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in layer16.parameters())
    ref = layer32(x)
    assert (out16.float() - ref).abs().max() <= 0.05 * ref.abs().max()


def test_model_with_mla_layers_builds_and_trains_a_step():
    cfg = dataclasses.replace(mla_cfg(), num_layers=2)
    model = build_model(cfg, SEED)
    tokens = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    logits = model(tokens)
    torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens.reshape(-1)).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "layers.0.mla.wkv_down.weight" in dict(model.named_parameters())


# ---- the CP block kernels with V narrower (or wider) than Q/K ----------------------------------------


def _qkv(dv: int, dtype=torch.float64, t: int = 8, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 4, t, 12, generator=g, dtype=dtype)
    k = torch.randn(2, 2, t, 12, generator=g, dtype=dtype)
    return q, k, torch.randn(2, 2, t, dv, generator=g, dtype=dtype)


@pytest.mark.parametrize("dv", [6, 12, 20])
def test_block_kernels_take_any_value_width(dv):
    q, k, v = _qkv(dv)
    out, lse = torch_block_attention(q, k, v, 0.3, causal=True)
    want = equal_width_sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.3, is_causal=True)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-12)
    dout = torch.randn_like(out)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = torch.autograd.grad(torch_block_attention(*leaves, 0.3, causal=True)[0], leaves, dout)
    got = torch_block_attention_backward(dout, q, k, v, out, lse, 0.3, True)
    for a, b in zip(got, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    if fused_block_available():
        q32, k32, v32, out32, dout32 = (t.float() for t in (q, k, v, out, dout))
        fo, fl = fused_block_attention(q32, k32, v32, 0.3, True)
        torch.testing.assert_close(fo, out32, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(fl, lse.float(), rtol=1e-5, atol=1e-5)
        for a, b in zip(fused_block_attention_backward(dout32, q32, k32, v32, fo, fl, 0.3, True), got, strict=True):
            torch.testing.assert_close(a, b.float(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kernel", ["torch", "auto"])
def test_ring_attention_on_one_rank_with_a_narrow_value(kernel):
    q, k, v = (t.requires_grad_() for t in _qkv(6, torch.float32))
    out = ring_attention(q, k, v, AxisGroup.single("cp"), scale=0.3, kernel=kernel)
    want = equal_width_sdpa(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 0.3, is_causal=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    dout = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), dout), torch.autograd.grad(want, (q, k, v), dout),
                    strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_decoding_with_a_latent_cache_equals_the_whole_forward():
    """A prompt then one token at a time, over the cached latent: the outputs of the full forward."""
    layer = build_mla(mla_cfg(rope_scaling=YARN))
    x = inputs()
    whole = layer(x)
    cache = DecodeCache()
    pieces = [layer(x[:, :5], torch.arange(5)[None], cache=cache)]
    pieces += [layer(x[:, t:t + 1], torch.tensor([[t]]), cache=cache) for t in range(5, T)]
    torch.testing.assert_close(torch.cat(pieces, 1), whole, rtol=0, atol=1e-10)
    assert cache.keys.shape == (B, 1, T, layer.kv_lora_rank) and cache.values.shape == (B, 1, T, layer.rope_dim)


@pytest.mark.parametrize("residual", ["standard", "ladder"])
def test_greedy_generation_of_an_mla_model_uses_the_latent_cache(residual):
    """launch/generate.py on an MLA model: cached decoding picks the tokens of full recomputation."""
    from launch.generate import greedy_generate, greedy_generate_uncached

    model = build_model(dataclasses.replace(mla_cfg(), num_layers=2, residual=residual), SEED).eval()
    prompt = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = greedy_generate(model, prompt, max_new_tokens=6)
    full = greedy_generate_uncached(model, prompt, max_new_tokens=6)
    assert torch.equal(cached.tokens, full.tokens)
    for a, b in zip(cached.step_logits, full.step_logits, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "bf16_autocast"])
def test_an_mla_model_trains_in_bf16(tmp_path, tiny, precision):
    """trainer.precision=bf16 (bf16 weights) and bf16_autocast: finite, falling losses."""
    from trainer.config import compose
    from trainer.trainer import Trainer

    overrides = tiny(run_dir=tmp_path / "run", steps=6) + [f"trainer.precision={precision}", "trainer.eval_interval=0",
                                                          "trainer.save_final=false", *MLA_OVERRIDES]
    trainer = Trainer(compose(overrides))
    losses = [trainer.train_step()["loss"] for _ in range(6)]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    if precision == "bf16":
        assert trainer.model.get_parameter("layers.0.mla.wkv_up.weight").dtype == torch.bfloat16
