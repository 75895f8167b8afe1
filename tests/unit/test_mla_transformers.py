"""foldtron's MLA against the DeepSeek-V3 attention block of Hugging Face `transformers` (a dev
extra): a small random config built locally (no downloads), the same weights, float64.

Tolerance: 2e-6 relative to the largest entry of each compared tensor. Everything runs in float64
except two things both sides do in float32 by design: the RoPE tables (float32 angles, computed
with the same float32 operations, YaRN included, so they agree bit for bit) and the RMSNorm
statistics of the two latents (HF's DeepseekV3RMSNorm casts to float32 whatever the input; ours
also applies the gain in float32, HF after casting back). The latents thus differ by float32
rounding (~6e-8 relative), which reaches the outputs as < 1e-6 relative (measured up to 5e-7). A
wrong weight layout, scale or RoPE convention is off by O(1). foldtron's naive and absorbed forms,
which share one norm, are compared at 1e-10 in tests/unit/test_mla.py.
"""
from __future__ import annotations

import pytest
import torch

from models.config import MLAConfig, ModelConfig, RopeScalingConfig
from models.init import materialize
from models.layers.mla import MultiHeadLatentAttention

transformers = pytest.importorskip("transformers", reason="transformers (a dev extra) is not installed")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip(f"transformers {transformers.__version__}: the test builds its config with the v5 API "
                "(rope_parameters)", allow_module_level=True)
modeling = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3",
                               reason="this transformers has no DeepSeek-V3 model")
if not hasattr(modeling, "DeepseekV3Attention"):
    pytest.skip("this transformers has no DeepseekV3Attention", allow_module_level=True)
DeepseekV3Config = transformers.DeepseekV3Config

B, T, HIDDEN, HEADS = 2, 16, 32, 4
NOPE, ROPE, V, KV_RANK = 8, 4, 6, 12
REL = 2e-6


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    torch.testing.assert_close(actual, expected, rtol=0, atol=REL * expected.abs().max().item(), msg=what)


def configs(q_lora_rank: int, yarn: bool, interleave: bool) -> tuple[ModelConfig, DeepseekV3Config]:
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    scaling = RopeScalingConfig()
    if yarn:
        scaling = RopeScalingConfig(type="yarn", factor=4.0, mscale=0.8, mscale_all_dim=1.0,
                                    original_max_position_embeddings=16)
        rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "mscale": 0.8, "mscale_all_dim": 1.0,
                "original_max_position_embeddings": 16, "beta_fast": 32.0, "beta_slow": 1.0}
    ours = ModelConfig(vocab_size=64, hidden_size=HIDDEN, num_heads=HEADS, token_mixers=["mla"], norm_eps=1e-6,
                       max_position_embeddings=64, rope_scaling=scaling,
                       mla=MLAConfig(q_lora_rank=q_lora_rank, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
                                     qk_rope_head_dim=ROPE, v_head_dim=V))
    theirs = DeepseekV3Config(vocab_size=64, hidden_size=HIDDEN, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                              q_lora_rank=q_lora_rank or None, kv_lora_rank=KV_RANK, qk_nope_head_dim=NOPE,
                              qk_rope_head_dim=ROPE, v_head_dim=V, max_position_embeddings=64,
                              rope_parameters=rope, rope_interleave=interleave, attention_bias=False,
                              attention_dropout=0.0, rms_norm_eps=1e-6)
    theirs._attn_implementation = "eager"
    return ours, theirs


def rope_rows(width: int, interleave: bool) -> torch.Tensor:
    """Row order of a RoPE block in the HF layout: DeepSeek's interleaved pairs (2i, 2i+1) are our
    rotate-half pairs (i, i + width/2)."""
    if not interleave:
        return torch.arange(width)
    return torch.stack([torch.arange(width // 2), torch.arange(width // 2) + width // 2], dim=1).reshape(-1)


def copy_weights(ours: MultiHeadLatentAttention, theirs: torch.nn.Module, interleave: bool) -> None:
    rope = rope_rows(ROPE, interleave)
    per_head = torch.cat([torch.arange(NOPE), NOPE + rope])
    q_rows = torch.cat([h * (NOPE + ROPE) + per_head for h in range(HEADS)])
    kv_down_rows = torch.cat([torch.arange(KV_RANK), KV_RANK + rope])
    with torch.no_grad():
        if ours.q_lora_rank:
            theirs.q_a_proj.weight.copy_(ours.wq_down.weight)
            theirs.q_a_layernorm.weight.copy_(ours.q_norm.weight)
            theirs.q_b_proj.weight.copy_(ours.wq_up.weight[q_rows])
        else:
            theirs.q_proj.weight.copy_(ours.wq.weight[q_rows])
        theirs.kv_a_proj_with_mqa.weight.copy_(ours.wkv_down.weight[kv_down_rows])
        theirs.kv_a_layernorm.weight.copy_(ours.kv_norm.weight)
        theirs.kv_b_proj.weight.copy_(ours.wkv_up.weight)
        theirs.o_proj.weight.copy_(ours.wo.weight)


@pytest.mark.parametrize("q_lora_rank", [16, 0], ids=["q-latent", "q-direct"])
@pytest.mark.parametrize("yarn", [False, True], ids=["rope", "yarn"])
@pytest.mark.parametrize("interleave", [False, True], ids=["rotate-half", "interleaved"])
def test_mla_matches_transformers_deepseek_v3_attention(q_lora_rank, yarn, interleave):
    ours_cfg, theirs_cfg = configs(q_lora_rank, yarn, interleave)
    with torch.device("meta"):
        ours = MultiHeadLatentAttention(ours_cfg)
    materialize(ours, 3, dtype=torch.float64)
    with torch.no_grad():  # norm gains away from their all-ones init, so that they are exercised
        for norm in [ours.kv_norm] + ([ours.q_norm] if q_lora_rank else []):
            norm.weight.uniform_(0.5, 1.5, generator=torch.Generator().manual_seed(1))
    theirs = modeling.DeepseekV3Attention(theirs_cfg, layer_idx=0).double()
    copy_weights(ours, theirs, interleave)
    rotary = modeling.DeepseekV3RotaryEmbedding(theirs_cfg)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64)
    dout = torch.randn(B, T, HIDDEN, generator=gen, dtype=torch.float64)
    positions = torch.arange(T)[None].expand(B, -1)
    mask = torch.full((T, T), float("-inf"), dtype=torch.float64).triu(1)[None, None]
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    out_ours = ours(x_ours, positions)
    out_theirs, _ = theirs(x_theirs, position_embeddings=rotary(x_theirs, positions), attention_mask=mask)
    assert_close(out_ours, out_theirs, "output")
    assert_close(ours.absorbed(x, positions), out_theirs.detach(), "absorbed output")

    out_ours.backward(dout)
    out_theirs.backward(dout)
    assert_close(x_ours.grad, x_theirs.grad, "input grad")
    assert_close(ours.wo.weight.grad, theirs.o_proj.weight.grad, "wo grad")
    assert_close(ours.wkv_up.weight.grad, theirs.kv_b_proj.weight.grad, "wkv_up grad")
    assert_close(ours.kv_norm.weight.grad, theirs.kv_a_layernorm.weight.grad, "kv_norm grad")
    kv_down_rows = torch.cat([torch.arange(KV_RANK), KV_RANK + rope_rows(ROPE, interleave)])
    assert_close(ours.wkv_down.weight.grad[kv_down_rows], theirs.kv_a_proj_with_mqa.weight.grad, "wkv_down grad")
