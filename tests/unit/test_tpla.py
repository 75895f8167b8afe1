"""TPLA semantics (models/inference, docs/tpla.md) against definitions written here head by head.

- the decode attention of LatentDecodeAttention with g simulated slices equals TPLA written out per
  head and per slice (its own slice norm, softmax and partial value; the whole RoPE key), after an
  exact MLA prefill, in float64;
- g = 1 equals MLA exactly: prompt + decode steps give the layer's own (expanded) forward over the
  whole sequence, float64, 1e-12;
- the Hadamard and PCA reparameterisations leave the whole model's outputs unchanged (float64) and
  do change TPLA at g > 1 (they are not no-ops);
- the pieces: slice norm, Hadamard matrix, PCA order, the latent cache.

The layer's RMSNorm takes its statistics in fp32 by design (docs/mla.md, "Precision"); the float64
tests patch it to float64 so that they check the algebra to rounding, not the precision policy.
"""
from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model
from models.config import MLAConfig
from models.inference.latent_attention import slice_rms_norm
from models.inference.latent_cache import LatentCache
from models.inference.reparam import (
    fold_latent_norm_gain,
    hadamard_matrix,
    pca_transform,
    reparameterize,
    rotate_latent,
)
from models.inference.tpla import LatentDecodeAttention, TPLAWeights, mla_layers
from models.init import materialize
from models.layers.mla import MultiHeadLatentAttention
from models.layers.norm import RMSNorm
from models.layers.rope import apply_rotary

HIDDEN, HEADS, R, NOPE, ROPE, V = 32, 4, 8, 4, 4, 6
B, PROMPT, NEW = 2, 5, 4


def fp64_norm_forward(self, x):
    normed = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
    return normed * self.weight


@pytest.fixture
def fp64_norms(monkeypatch):
    monkeypatch.setattr(RMSNorm, "forward", fp64_norm_forward)


def cfg(q_lora_rank: int = 12, num_layers: int = 1) -> ModelConfig:
    mla = MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=R, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
                    v_head_dim=V)
    return ModelConfig(vocab_size=29, hidden_size=HIDDEN, num_layers=num_layers, num_heads=HEADS,
                       token_mixers=["mla"], mla=mla, ffn_hidden_size=48, max_position_embeddings=64)


def randomize_gains(module: torch.nn.Module, seed: int = 5) -> None:
    """Norm gains away from 1, so folding them is exercised."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, RMSNorm):
                m.weight.copy_(0.5 + torch.rand(m.weight.shape, generator=g, dtype=torch.float64).to(m.weight.dtype))


def layer64(q_lora_rank: int = 12) -> MultiHeadLatentAttention:
    with torch.device("meta"):
        layer = MultiHeadLatentAttention(cfg(q_lora_rank))
    layer = materialize(layer, 3, dtype=torch.float64).eval()
    randomize_gains(layer)
    return layer


def sequence(length: int = PROMPT + NEW) -> torch.Tensor:
    return torch.randn(B, length, HIDDEN, generator=torch.Generator().manual_seed(11), dtype=torch.float64)


def decode(layer: MultiHeadLatentAttention, x: torch.Tensor, state: LatentDecodeAttention) -> torch.Tensor:
    """Prefill x[:, :PROMPT], then one call per remaining token; the outputs of every token."""
    outs = [layer(x[:, :PROMPT], torch.arange(PROMPT).expand(B, PROMPT), cache=state)]
    for t in range(PROMPT, x.shape[1]):
        outs.append(layer(x[:, t:t + 1], torch.full((B, 1), t), cache=state))
    return torch.cat(outs, dim=1)


def rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * gain


def tpla_reference(layer: MultiHeadLatentAttention, x: torch.Tensor, g: int, latent_norm: str = "slice"
                   ) -> torch.Tensor:
    """The decode steps' outputs of TPLA with g slices, from the paper's description, loop by loop:
    prompt latents normalised over the whole latent (exact MLA prefill), decode latents per slice
    (or, latent_norm="full", over the whole latent too)."""
    w = R // g
    positions = torch.arange(x.shape[1]).expand(B, -1)
    cos, sin = layer.rope(positions)
    if layer.q_lora_rank:
        cq = rms(x @ layer.wq_down.weight.T, layer.q_norm.weight, layer.q_norm.eps)
        q = cq @ layer.wq_up.weight.T
    else:
        q = x @ layer.wq.weight.T
    q = q.view(B, -1, HEADS, NOPE + ROPE).transpose(1, 2)
    q_nope, q_pe = q[..., :NOPE], apply_rotary(q[..., NOPE:], cos, sin)
    down = x @ layer.wkv_down.weight.T
    c_kv, k_pe = down[..., :R], apply_rotary(down[..., R:].unsqueeze(1), cos, sin).squeeze(1)
    gain, eps = layer.kv_norm.weight, layer.kv_norm.eps
    latent = torch.empty_like(c_kv)
    latent[:, :PROMPT] = rms(c_kv[:, :PROMPT], gain, eps)
    if latent_norm == "full":
        latent[:, PROMPT:] = rms(c_kv[:, PROMPT:], gain, eps)
    for s in range(g if latent_norm == "slice" else 0):
        cols = slice(s * w, (s + 1) * w)
        latent[:, PROMPT:, cols] = rms(c_kv[:, PROMPT:, cols], gain[cols], eps)
    up = layer.wkv_up.weight.view(HEADS, NOPE + V, R)
    out = torch.zeros(B, x.shape[1] - PROMPT, HIDDEN, dtype=x.dtype)
    for b in range(B):
        for t in range(PROMPT, x.shape[1]):
            value = []
            for h in range(HEADS):
                v_h = torch.zeros(V, dtype=x.dtype)
                for s in range(g):
                    cols = slice(s * w, (s + 1) * w)
                    q_lat = q_nope[b, h, t] @ up[h, :NOPE, cols]
                    scores = torch.stack([(q_lat @ latent[b, j, cols] + q_pe[b, h, t] @ k_pe[b, j]) * layer.softmax_scale
                                          for j in range(t + 1)])
                    p = torch.softmax(scores, 0)
                    v_h = v_h + (p @ latent[b, :t + 1, cols]) @ up[h, NOPE:, cols].T
                value.append(v_h)
            out[b, t - PROMPT] = torch.cat(value) @ layer.wo.weight.T
    return out


@pytest.mark.parametrize("q_lora_rank", [12, 0], ids=["q-latent", "q-direct"])
@pytest.mark.parametrize("g", [1, 2, 4])
def test_tpla_decode_equals_the_definition(fp64_norms, q_lora_rank, g):
    layer = layer64(q_lora_rank)
    x = sequence()
    with torch.no_grad():
        got = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g)))
        prefill = layer(x[:, :PROMPT])
    torch.testing.assert_close(got[:, :PROMPT], prefill, rtol=1e-12, atol=1e-12)  # prefill is exact MLA
    torch.testing.assert_close(got[:, PROMPT:], tpla_reference(layer, x, g), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("g", [2, 4])
def test_tpla_with_the_whole_latent_norm_equals_the_definition(fp64_norms, g):
    layer = layer64()
    x = sequence()
    with torch.no_grad():
        got = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g, latent_norm="full")))
        by_rank = [decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g, (s,), "full")))
                   for s in range(g)]
    want = tpla_reference(layer, x, g, latent_norm="full")
    torch.testing.assert_close(got[:, PROMPT:], want, rtol=1e-11, atol=1e-12)
    # One slice per "rank": the partial outputs sum to the same (what the all-reduce does).
    torch.testing.assert_close(sum(o[:, PROMPT:] for o in by_rank), want, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("q_lora_rank", [12, 0], ids=["q-latent", "q-direct"])
def test_one_slice_is_exactly_mla(fp64_norms, q_lora_rank):
    layer = layer64(q_lora_rank)
    x = sequence()
    with torch.no_grad():
        tpla = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, 1)))
        exact_cache = decode(layer, x, LatentDecodeAttention())
        full = layer(x)  # the expanded training form over the whole sequence
    torch.testing.assert_close(tpla, full, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(exact_cache, full, rtol=1e-12, atol=1e-13)


def test_slices_change_the_result_and_the_error_is_small():
    """g > 1 is an approximation: not equal to MLA, but close on a random layer."""
    layer = layer64()
    x = sequence()
    with torch.no_grad():
        exact = decode(layer, x, LatentDecodeAttention())[:, PROMPT:]
        for g in (2, 4):
            got = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g)))[:, PROMPT:]
            rel = ((got - exact).norm() / exact.norm()).item()
            assert 1e-6 < rel < 1.0, (g, rel)


def model64(num_layers: int = 2):
    model = build_model(cfg(num_layers=num_layers), seed=4, dtype=torch.float64).eval()
    randomize_gains(model)
    return model


@pytest.mark.parametrize("transform", ["hadamard", "pca"])
@pytest.mark.parametrize("g", [2, 4])
def test_reparameterisation_leaves_the_model_unchanged(fp64_norms, transform, g):
    model = model64()
    tokens = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(2))
    calibration = torch.randint(0, 29, (3, 16), generator=torch.Generator().manual_seed(8))
    layers = mla_layers(model)
    x = sequence()
    with torch.no_grad():
        before = model(tokens)
        layer = layers[0]
        tpla_before = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g)))
        reparameterize(model, layers, transform, g, calibration)
        after = model(tokens)
        tpla_after = decode(layer, x, LatentDecodeAttention(TPLAWeights.from_layer(layer, g)))
        exact_after = decode(layer, x, LatentDecodeAttention())
    torch.testing.assert_close(after, before, rtol=1e-10, atol=1e-12)
    assert all(torch.all(l.kv_norm.weight == 1) for l in layers.values())
    # Before slicing, the transform changes nothing; TPLA's slices see other channels afterwards.
    assert (tpla_after[:, PROMPT:] - tpla_before[:, PROMPT:]).abs().max() > 1e-8
    torch.testing.assert_close(exact_after[:, :PROMPT], tpla_after[:, :PROMPT], rtol=1e-12, atol=1e-12)


def test_reparameterisation_in_float32_keeps_the_outputs_to_rounding():
    model = build_model(cfg(num_layers=2), seed=4).eval()
    randomize_gains(model)
    tokens = torch.randint(0, 29, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        before = model(tokens)
        reparameterize(model, mla_layers(model), "hadamard", 2)
        after = model(tokens)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)


def test_rotate_latent_refuses_an_unfolded_gain():
    layer = layer64()
    with pytest.raises(ValueError, match="fold_latent_norm_gain"):
        rotate_latent(layer, hadamard_matrix(R))
    fold_latent_norm_gain(layer)
    rotate_latent(layer, hadamard_matrix(R))


def test_hadamard_matrix_is_orthonormal_with_equal_magnitudes():
    for n in (1, 2, 8, 64):
        h = hadamard_matrix(n)
        torch.testing.assert_close(h @ h.T, torch.eye(n, dtype=torch.float64))
        assert torch.allclose(h.abs(), torch.full((n, n), n ** -0.5, dtype=torch.float64))
    with pytest.raises(ValueError, match="power-of-two"):
        hadamard_matrix(12)


def test_pca_deals_principal_axes_round_robin_over_slices():
    g = torch.Generator().manual_seed(0)
    scales = torch.tensor([8.0, 7.0, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    latents = torch.randn(4000, 8, generator=g, dtype=torch.float64) * scales  # axes = the coordinates
    q = pca_transform(latents, degree=2)
    torch.testing.assert_close(q.T @ q, torch.eye(8, dtype=torch.float64))
    # Slice 0 gets axes 0, 2, 4, 6 and slice 1 gets 1, 3, 5, 7 (largest first within each).
    assert q.abs().argmax(dim=0).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]


def test_slice_norm_is_the_rms_norm_of_each_slice():
    x = torch.randn(3, 8, dtype=torch.float64)
    gain = torch.rand(8, dtype=torch.float64)
    got = slice_rms_norm(x, gain, 1e-6, 4)
    want = torch.cat([rms(x[:, :4], gain[:4], 1e-6), rms(x[:, 4:], gain[4:], 1e-6)], dim=-1)
    torch.testing.assert_close(got, want)
    norm = RMSNorm(8, 1e-6)
    with torch.no_grad():
        norm.weight.copy_(gain.float())
    x32 = x.float()
    assert torch.equal(slice_rms_norm(x32, gain.float(), 1e-6, 8), norm(x32))  # one slice: RMSNorm itself


def test_latent_cache_grows_and_keeps_its_contents():
    cache = LatentCache(capacity=2)
    rows = [torch.randn(2, n, 3) for n in (2, 1, 4)]
    keys = [torch.randn(2, n, 2) for n in (2, 1, 4)]
    start = 0
    for r, k in zip(rows, keys):
        positions = torch.arange(start, start + r.shape[1]).expand(2, -1)
        cache.append(r, k, positions)
        start += r.shape[1]
    assert torch.equal(cache.latent, torch.cat(rows, 1)) and torch.equal(cache.rope_key, torch.cat(keys, 1))
    assert cache.positions[0].tolist() == list(range(7))
    assert cache.nbytes() == 2 * 7 * (3 + 2) * 4
