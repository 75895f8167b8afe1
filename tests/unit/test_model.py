"""Unit tests of the single-process decoder model (models package)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    CHANNEL_MIXERS,
    TOKEN_MIXERS,
    LayerSpec,
    ModelConfig,
    build_model,
    layer_specs,
    materialize,
    stable_param_seed,
)
from models.init import generate_full_tensor, normal_init
from models.layers.rope import RotaryEmbedding, apply_rotary
from models.mixers import CHANNEL_MIXER_CLASSES, TOKEN_MIXER_CLASSES
from parallel_state.params import mark_shard, param_meta

VOCAB = 61
SEED = 1234


def tiny_config(**overrides) -> ModelConfig:
    fields = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "num_layers": 4,
        "num_heads": 4,
        "num_kv_heads": 2,
        "ffn_hidden_size": 48,
        "max_position_embeddings": 64,
    }
    fields.update(overrides)
    return ModelConfig(**fields)


def random_tokens(batch: int = 2, seq_len: int = 10, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(seed))


# --- config and specs -------------------------------------------------------------------------


def test_config_helpers_follow_llama_rules():
    cfg = ModelConfig(vocab_size=10, hidden_size=256, num_heads=4)
    assert cfg.head_dim == 64
    assert cfg.kv_heads == 4
    assert cfg.resolved_ffn_hidden_size() == 704  # int(8*256/3) = 682 -> next multiple of 64
    assert ModelConfig(ffn_hidden_size=100).resolved_ffn_hidden_size() == 100
    assert ModelConfig(num_kv_heads=1).kv_heads == 1


def test_config_is_an_omegaconf_structured_config():
    omegaconf = pytest.importorskip("omegaconf")
    schema = omegaconf.OmegaConf.structured(ModelConfig)
    merged = omegaconf.OmegaConf.merge(schema, {"vocab_size": 99, "token_mixers": ["gla", "attention"]})
    cfg = omegaconf.OmegaConf.to_object(merged)
    assert isinstance(cfg, ModelConfig)
    assert cfg.vocab_size == 99 and cfg.token_mixers == ["gla", "attention"]
    # Field types are enforced: optional ints accept None, not strings; plain ints reject None.
    schema.num_kv_heads = None
    with pytest.raises(omegaconf.ValidationError):
        schema.vocab_size = "many"
    with pytest.raises(omegaconf.ValidationError):
        schema.hidden_size = None


def test_hybrid_spec_cycles_mixers_over_layers():
    cfg = tiny_config(
        num_layers=8, token_mixers=["gla", "gla", "gla", "attention"], channel_mixers=["mlp", "moe"]
    )
    specs = layer_specs(cfg)
    assert [s.token_mixer for s in specs] == ["gla", "gla", "gla", "attention"] * 2
    assert [s.channel_mixer for s in specs] == ["mlp", "moe"] * 4
    assert specs[3] == LayerSpec("attention", "moe", "standard")


def test_spec_constants_match_implemented_classes():
    assert set(TOKEN_MIXERS) == set(TOKEN_MIXER_CLASSES)
    assert set(CHANNEL_MIXERS) == set(CHANNEL_MIXER_CLASSES)


@pytest.mark.parametrize(
    "field_name, overrides, bad_value",
    [
        ("token_mixers", {"token_mixers": ["attention", "mamba"]}, "mamba"),
        ("channel_mixers", {"channel_mixers": ["nope"]}, "nope"),
        ("residual", {"residual": "hyper"}, "hyper"),
    ],
)
def test_unknown_mixer_raises_naming_field_value_and_choices(field_name, overrides, bad_value):
    with pytest.raises(ValueError) as excinfo:
        build_model(tiny_config(**overrides), SEED)
    message = str(excinfo.value)
    assert field_name in message and repr(bad_value) in message and "available" in message


def test_missing_vocab_size_raises():
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(tiny_config(vocab_size=None), SEED)


# --- forward ----------------------------------------------------------------------------------


def test_output_shapes_and_parameter_names():
    model = build_model(tiny_config(), SEED)
    tokens = random_tokens(3, 7)
    assert model(tokens).shape == (3, 7, VOCAB)
    assert model.token_losses(tokens, tokens).shape == (3, 7)
    names = dict(model.named_parameters())
    assert names["layers.3.attention.wq.weight"].shape == (32, 32)
    assert names["layers.3.attention.wk.weight"].shape == (16, 32)  # 2 kv heads x head_dim 8
    assert names["layers.0.mlp.w2.weight"].shape == (32, 48)


def complex_rotation_reference(x: torch.Tensor, positions: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate pairs (x[i], x[i + d/2]) as complex numbers by exp(j * pos * theta^(-2i/d))."""
    half = x.shape[-1] // 2
    freqs = theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.shape[-1])
    angles = positions.double()[:, None] * freqs[None, :]  # [T, half]
    z = torch.complex(x[..., :half].double(), x[..., half:].double()) * torch.polar(
        torch.ones_like(angles), angles
    )
    return torch.cat((z.real, z.imag), dim=-1)


def test_rope_matches_complex_rotation_reference():
    rope = RotaryEmbedding(head_dim=8, theta=500.0)
    x = torch.randn(1, 3, 6, 8)  # [B, heads, T, head_dim]
    positions = torch.tensor([0, 1, 5, 17, 100, 2047])
    cos, sin = rope(positions[None])
    rotated = apply_rotary(x, cos, sin)
    expected = complex_rotation_reference(x, positions, 500.0)
    # fp32 angles near 2047 rad carry ~1e-4 rounding; a wrong convention errs by O(1).
    torch.testing.assert_close(rotated.double(), expected, atol=5e-4, rtol=1e-4)


def test_rope_scores_depend_only_on_relative_position():
    rope = RotaryEmbedding(head_dim=16, theta=10000.0)
    q = torch.randn(1, 1, 1, 16)
    k = torch.randn(1, 1, 1, 16)

    def score(query_pos: int, key_pos: int) -> torch.Tensor:
        cos_q, sin_q = rope(torch.tensor([[query_pos]]))
        cos_k, sin_k = rope(torch.tensor([[key_pos]]))
        return (apply_rotary(q, cos_q, sin_q) * apply_rotary(k, cos_k, sin_k)).sum()

    torch.testing.assert_close(score(3, 1), score(40, 38), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-4)


def test_gqa_equals_mha_with_kv_heads_repeated_per_group():
    gqa = build_model(tiny_config(num_heads=4, num_kv_heads=2), SEED)
    mha = build_model(tiny_config(num_heads=4, num_kv_heads=4), SEED + 1)
    head_dim, groups = 8, 2
    mha_params = dict(mha.named_parameters())
    with torch.no_grad():
        for name, param in gqa.named_parameters():
            if name.endswith(("wk.weight", "wv.weight")):
                per_head = param.view(2, head_dim, -1).repeat_interleave(groups, dim=0)
                mha_params[name].copy_(per_head.reshape(4 * head_dim, -1))
            else:
                mha_params[name].copy_(param)
    tokens = random_tokens()
    torch.testing.assert_close(gqa(tokens), mha(tokens), atol=1e-5, rtol=1e-5)


def test_changing_a_token_does_not_change_earlier_logits():
    model = build_model(tiny_config(), SEED)
    tokens = random_tokens(1, 12)
    changed = tokens.clone()
    t = 7
    changed[0, t] = (tokens[0, t] + 1) % VOCAB
    before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], atol=0, rtol=0)
    assert not torch.allclose(before[:, t:], after[:, t:])


def test_explicit_positions_match_default_and_follow_tokens_when_reordered():
    model = build_model(tiny_config(), SEED)
    tokens = random_tokens(2, 9)
    positions = torch.arange(9).expand(2, 9)
    reference = model(tokens)
    torch.testing.assert_close(model(tokens, positions), reference, atol=1e-5, rtol=1e-5)
    # Tokens shuffled together with their original positions (as context parallelism passes them).
    order = torch.randperm(9, generator=torch.Generator().manual_seed(3))
    shuffled = model(tokens[:, order], positions[:, order])
    torch.testing.assert_close(shuffled, reference[:, order], atol=1e-5, rtol=1e-5)


def test_token_losses_equal_unreduced_cross_entropy_and_ignore_minus_100():
    model = build_model(tiny_config(), SEED)
    tokens = random_tokens(2, 8)
    labels = random_tokens(2, 8, seed=1)
    labels[0, :3] = -100
    labels[1, -1] = -100
    losses = model.token_losses(tokens, labels)
    expected = F.cross_entropy(model(tokens).reshape(-1, VOCAB), labels.reshape(-1), reduction="none")
    torch.testing.assert_close(losses, expected.view(2, 8))
    assert torch.all(losses[labels == -100] == 0)
    assert torch.all(losses[labels != -100] > 0)


def test_bf16_autocast_forward_runs_and_losses_are_fp32():
    model = build_model(tiny_config(), SEED)
    tokens = random_tokens()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(tokens)
        losses = model.token_losses(tokens, tokens)
    assert logits.dtype == torch.bfloat16
    assert losses.dtype == torch.float32
    assert torch.isfinite(losses).all()
    torch.testing.assert_close(losses, model.token_losses(tokens, tokens), atol=0.1, rtol=0.05)


def test_bf16_materialized_model_keeps_rope_frequencies_fp32():
    model = build_model(tiny_config(), SEED, dtype=torch.bfloat16)
    assert model.layers["0"].attention.wq.weight.dtype == torch.bfloat16
    assert model.layers["0"].attention.rope.inv_freq.dtype == torch.float32
    assert model.token_losses(random_tokens(), random_tokens()).dtype == torch.float32


def test_sgd_steps_lower_the_loss_on_a_repeated_sequence():
    torch.manual_seed(0)
    model = build_model(tiny_config(num_layers=2), SEED)
    pattern = random_tokens(1, 8)
    sequence = pattern.repeat(1, 4)  # [1, 32]
    inputs, labels = sequence[:, :-1], sequence[:, 1:]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    losses = []
    for _ in range(15):
        loss = model.token_losses(inputs, labels).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


# --- initialisation ---------------------------------------------------------------------------


def test_partial_model_has_the_same_tensors_as_the_full_model():
    cfg = tiny_config()
    full = build_model(cfg, SEED).state_dict()
    part = build_model(cfg, SEED, layer_ids=[2, 3], has_embedding=False, has_head=False).state_dict()
    assert part and all(name.startswith(("layers.2.", "layers.3.")) for name in part)
    assert set(part) == {name for name in full if name.startswith(("layers.2.", "layers.3."))}
    for name, tensor in part.items():
        assert torch.equal(tensor, full[name]), name


def test_same_seed_is_identical_and_different_seed_differs():
    cfg = tiny_config()
    a = build_model(cfg, SEED).state_dict()
    b = build_model(cfg, SEED).state_dict()
    c = build_model(cfg, SEED + 1).state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    for name in a:
        if name.endswith("norm.weight"):
            assert torch.equal(a[name], torch.ones_like(a[name]))
        else:
            assert not torch.equal(a[name], c[name]), name


def test_init_stds_follow_megatron_scaling():
    cfg = tiny_config(hidden_size=64, ffn_hidden_size=256, init_std=0.05, num_layers=8)
    model = build_model(cfg, SEED, layer_ids=[5], has_embedding=False, has_head=False)
    layer = model.layers["5"]
    scaled = 0.05 / math.sqrt(2 * 8)
    assert layer.attention.wq.weight.std().item() == pytest.approx(0.05, rel=0.05)
    assert layer.attention.wo.weight.std().item() == pytest.approx(scaled, rel=0.05)
    assert layer.mlp.w2.weight.std().item() == pytest.approx(scaled, rel=0.05)


def test_stable_param_seed_is_deterministic_and_name_sensitive():
    assert stable_param_seed(1, "a.weight") == stable_param_seed(1, "a.weight")
    assert stable_param_seed(1, "a.weight") != stable_param_seed(1, "b.weight")
    assert stable_param_seed(1, "a.weight") != stable_param_seed(2, "a.weight")
    assert 0 <= stable_param_seed(7, "x") < 2**63


class ShardedLinear(nn.Module):
    """A minimal tensor-parallel layer for the init tests: holds shard `index` of `count` along `dim`."""

    def __init__(self, full_shape, dim: int, index: int, count: int):
        super().__init__()
        shape = list(full_shape)
        shape[dim] //= count
        self.weight = nn.Parameter(torch.empty(shape, device="meta"))
        mark_shard(self.weight, dim, index, count)

    def init_specs(self):
        return {"weight": normal_init(0.02)}


@pytest.mark.parametrize("dim", [0, 1])
def test_sharded_parameter_gets_its_slice_of_the_full_tensor(dim):
    full_shape, count = (12, 6), 3
    full = generate_full_tensor(normal_init(0.02), SEED, "proj.weight", full_shape)
    for index in range(count):
        holder = nn.Module()
        holder.proj = ShardedLinear(full_shape, dim, index, count)
        materialize(holder, SEED)
        assert param_meta(holder.proj.weight).shard == (dim, index, count)
        assert torch.equal(holder.proj.weight, full.chunk(count, dim)[index])


def test_tied_embeddings_share_storage_and_are_counted_once():
    tied = build_model(tiny_config(tie_embeddings=True), SEED)
    untied = build_model(tiny_config(), SEED)
    assert tied.output.weight is tied.embedding.weight
    assert tied.output.weight.data_ptr() == tied.embedding.weight.data_ptr()
    assert tied.num_parameters() == untied.num_parameters() - VOCAB * 32
    # A last pipeline stage without the embedding starts from the same values as the embedding.
    head_only = build_model(tiny_config(tie_embeddings=True), SEED, layer_ids=[], has_embedding=False)
    assert torch.equal(head_only.output.weight, tied.embedding.weight)


def test_num_parameters_matches_hand_count():
    hidden, heads, kv_heads, ffn, layers = 32, 4, 2, 48, 4
    head_dim = hidden // heads
    model = build_model(tiny_config(), SEED)
    attention = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2
    mlp = 3 * hidden * ffn
    per_layer = attention + mlp + 2 * hidden
    body = layers * per_layer + hidden  # + final norm
    assert model.num_parameters() == body + 2 * VOCAB * hidden
    assert model.num_parameters(exclude_embeddings=True) == body


def test_flops_per_token_matches_hand_formula():
    hidden, heads, kv_heads, ffn, layers, seq_len = 32, 4, 2, 48, 4, 128
    head_dim = hidden // heads
    model = build_model(tiny_config(), SEED)
    matmul_params_per_layer = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim + 3 * hidden * ffn
    forward = layers * (2 * matmul_params_per_layer + 2 * 2 * seq_len * head_dim * heads)
    forward += 2 * hidden * VOCAB
    assert model.flops_per_token(seq_len) == pytest.approx(3 * forward)


def test_pipeline_stages_composed_equal_the_full_model():
    cfg = tiny_config()
    full = build_model(cfg, SEED)
    first = build_model(cfg, SEED, layer_ids=[0, 1], has_head=False)
    last = build_model(cfg, SEED, layer_ids=[2, 3], has_embedding=False)
    tokens = random_tokens()
    torch.testing.assert_close(last(first(tokens)), full(tokens), atol=0, rtol=0)


def test_dropout_is_active_only_in_training_mode():
    model = build_model(tiny_config(dropout=0.5, attention_dropout=0.5), SEED)
    tokens = random_tokens()
    assert not torch.equal(model(tokens), model(tokens))
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_parameter_without_init_spec_is_an_error():
    holder = nn.Module()
    holder.proj = nn.Linear(4, 4, bias=False, device="meta")
    with pytest.raises(ValueError, match="proj.weight"):
        materialize(holder, SEED)


def test_layer_ids_must_be_increasing_and_in_range():
    with pytest.raises(ValueError, match="layer_ids"):
        build_model(tiny_config(), SEED, layer_ids=[3, 2])
    with pytest.raises(ValueError, match="layer_ids"):
        build_model(tiny_config(), SEED, layer_ids=[4])


def test_config_is_not_mutated_by_building():
    cfg = tiny_config()
    before = dataclasses.asdict(cfg)
    build_model(cfg, SEED)
    assert dataclasses.asdict(cfg) == before
