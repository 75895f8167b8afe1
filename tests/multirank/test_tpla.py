"""TPLA and exact MLA decoding under TP on 2 and 4 gloo ranks, against one process.

Each rank builds its TP shard of the same seeded model. Checked:
- one MLA layer, prompt + decode steps: exact MLA under TP equals the one-process layer; TPLA with
  g = tp (each rank one latent slice, an all-reduce of the partial outputs) equals the one-process
  simulation of the same g slices, which tests/unit/test_tpla.py checks against the definition;
- the cache each rank keeps: the whole latent + k_pe for MLA, its latent slice + k_pe for TPLA;
- whole-model generation (greedy and top-p sampling, Hadamard and PCA transforms folded on the ranks):
  the same tokens and logits as one process simulating g slices.
"""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, build_model
from models.config import MLAConfig
from models.inference.config import SamplingConfig, TPLAConfig
from models.inference.generation import LatentDecoder, generate
from models.inference.tpla import LatentDecodeAttention, TPLAWeights, mla_layers
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from parallel_state.groups import init
from parallel_state.topology import Topology

pytestmark = pytest.mark.xdist_group("rank_pool")

SEED, VOCAB, B, PROMPT, NEW = 7, 61, 2, 5, 4
R, ROPE = 8, 4
CALIBRATION = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(8))
PROMPT_IDS = torch.randint(0, VOCAB, (B, PROMPT), generator=torch.Generator().manual_seed(3))
CASES = {"greedy": (SamplingConfig(), "none", "slice"), "hadamard": (SamplingConfig(), "hadamard", "slice"),
         "pca top-p": (SamplingConfig(temperature=0.8, top_p=0.9, seed=4), "pca", "slice"),
         "pca full-norm": (SamplingConfig(), "pca", "full")}


def model_cfg() -> ModelConfig:
    mla = MLAConfig(q_lora_rank=12, kv_lora_rank=R, qk_nope_head_dim=4, qk_rope_head_dim=ROPE, v_head_dim=6)
    return ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, ffn_hidden_size=48,
                       max_position_embeddings=64, token_mixers=["mla", "attention"], mla=mla)


def build(tp: TPContext | None = None):
    return build_model(model_cfg(), seed=SEED, par=ParallelContext(tp=tp or TPContext())).eval()


def decode_layer(layer, state: LatentDecodeAttention) -> tuple[torch.Tensor, int]:
    x = torch.randn(B, PROMPT + NEW, 32, generator=torch.Generator().manual_seed(11))
    outs = [layer(x[:, :PROMPT], torch.arange(PROMPT).expand(B, PROMPT), cache=state)]
    for t in range(PROMPT, PROMPT + NEW):
        outs.append(layer(x[:, t:t + 1], torch.full((B, 1), t), cache=state))
    return torch.cat(outs, 1), state.cache.nbytes()


def layer_outputs(model, g: int | None) -> dict:
    layer = mla_layers(model)[0]
    with torch.inference_mode():
        exact = decode_layer(layer, LatentDecodeAttention())
        tpla = decode_layer(layer, LatentDecodeAttention(TPLAWeights.from_layer(layer, g or model.tp.size)))
    return {"exact": exact, "tpla": tpla}


def generations(model, g: int | None) -> dict:
    out = {}
    for name, (sampling, transform, norm) in CASES.items():
        tpla = TPLAConfig(enabled=True, degree=g, transform=transform, latent_norm=norm)
        decoder = LatentDecoder(model, tpla, CALIBRATION)
        out[name] = generate(model, PROMPT_IDS, NEW, sampling, decoder.caches(PROMPT + NEW))
    return out


def on_rank() -> dict:
    n = dist.get_world_size()
    ps = init(Topology(n, tp=n))
    model = build(TPContext(ps.tp))
    held = TPLAWeights.from_layer(mla_layers(model)[0], n)
    result = {"layer": layer_outputs(model, None), "generate": generations(model, None),
              "held": {k: getattr(held, k) for k in ("slices", "wq", "w_latent", "w_rope", "gain", "w_uk", "w_uv", "wo")}}
    ps.destroy()
    return result


@pytest.mark.parametrize("n", [2, 4])
def test_tpla_and_mla_decoding_under_tp_match_one_process(rank_pools, n):
    results = rank_pools.get(n).run(on_rank, timeout_s=240)
    reference = build()
    ref_layer = layer_outputs(reference, n)
    for r in results:
        for mode in ("exact", "tpla"):
            torch.testing.assert_close(r["layer"][mode][0], ref_layer[mode][0], rtol=1e-5, atol=1e-6, msg=mode)
        # MLA: every rank caches the whole latent; TPLA: its slice (plus the shared RoPE key).
        tokens = B * (PROMPT + NEW) * 4
        assert r["layer"]["exact"][1] == tokens * (R + ROPE) == ref_layer["exact"][1]
        assert r["layer"]["tpla"][1] == tokens * (R // n + ROPE)
    # What rank i holds: every head's query weights and W_O, its channels I_i of W_DKV, the gain, W_UK
    # and W_UV (every head), and the RoPE rows of W_DKV.
    layer, width = mla_layers(reference)[0], R // n
    up = layer.wkv_up.weight.view(4, 4 + 6, R)
    for i, r in enumerate(results):
        channels = slice(i * width, (i + 1) * width)
        want = {"slices": (i,), "wq": layer.wq_up.weight, "w_latent": layer.wkv_down.weight[channels],
                "w_rope": layer.wkv_down.weight[R:], "gain": layer.kv_norm.weight[channels],
                "w_uk": up[:, :4, channels], "w_uv": up[:, 4:, channels], "wo": layer.wo.weight}
        for key, value in want.items():
            assert r["held"][key] == value if key == "slices" else torch.equal(r["held"][key], value), key
    ref_gen = generations(build(), n)  # its own model: the transforms are folded into the weights
    for name in CASES:
        for r in results:
            assert torch.equal(r["generate"][name].tokens, ref_gen[name].tokens), name
            for a, b in zip(r["generate"][name].step_logits, ref_gen[name].step_logits):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
