"""The ladder residual on one process (docs/ladder.md): its recurrence, its invariants, hybrids, restarts."""
from __future__ import annotations

import pytest
import torch

from models import ModelConfig, build_model, layer_specs
from models.layers.tensor_parallel import PendingTensor
from models.spec import first_ladder_layer, ladder_run_starts

VOCAB = 61
SEED = 1234
MIXER_CASES = {
    "attention+mlp": {},
    "gla+mlp": {"token_mixers": ["gla"]},
    "pararnn_gru+mlp": {"token_mixers": ["pararnn_gru"], "pararnn": {"mode": "sequential"}},
    "pararnn_lstm+mlp": {"token_mixers": ["pararnn_lstm"], "pararnn": {"mode": "sequential"}},
    "attention+moe": {"channel_mixers": ["moe"], "moe": {"num_experts": 4, "ffn_hidden_size": 16}},
}


def tiny_config(**overrides) -> ModelConfig:
    from models.config import ParaRNNConfig
    from moe.config import MoEConfig
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 3, "num_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 48, "max_position_embeddings": 64}
    if "pararnn" in overrides:
        overrides = {**overrides, "pararnn": ParaRNNConfig(**overrides["pararnn"])}
    if "moe" in overrides:
        overrides = {**overrides, "moe": MoEConfig(**overrides["moe"])}
    fields.update(overrides)
    return ModelConfig(**fields)


def tokens(batch: int = 2, seq_len: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq_len), generator=torch.Generator().manual_seed(0))


def complete(out) -> torch.Tensor:
    return out.wait() if isinstance(out, PendingTensor) else out


def reference_ladder(model, input_ids: torch.Tensor) -> torch.Tensor:
    """The recurrence written out: s_j = s_{j-1} + f_j(s_{j-2}), s_{-1} = s_0, over every layer."""
    streams = [model.embedding(input_ids)] * 2  # [s_{-1}, s_0]
    for block in model.layers.values():
        for norm, mixer, positions in ((block.token_mixer_norm, block.token_mixer, True),
                                       (block.channel_mixer_norm, block.channel_mixer, False)):
            x = norm(streams[-2])
            out = complete(mixer(x, None) if positions else mixer(x))
            streams.append(streams[-1] + out)
    return model.output(model.norm(streams[-1]))


def grads(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


def test_zero_ladder_layers_is_the_standard_model_bit_for_bit():
    ids = tokens()
    standard = build_model(tiny_config(), SEED)
    ladder0 = build_model(tiny_config(residual="ladder", ladder_layers=0), SEED)
    out_s, out_l = standard(ids), ladder0(ids)
    assert torch.equal(out_s, out_l)
    out_s.square().mean().backward()
    out_l.square().mean().backward()
    gs, gl = grads(standard), grads(ladder0)
    assert gs.keys() == gl.keys() and all(torch.equal(gs[k], gl[k]) for k in gs)


@pytest.mark.parametrize("case", list(MIXER_CASES))
def test_ladder_model_computes_the_recurrence_forward_and_backward(case):
    cfg = tiny_config(residual="ladder", **MIXER_CASES[case])
    ids = tokens()
    model = build_model(cfg, SEED)
    reference = build_model(cfg, SEED)
    out, expected = model(ids), reference_ladder(reference, ids)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().mean().backward()
    expected.square().mean().backward()
    got, want = grads(model), grads(reference)
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
    # And it is a different model from the standard one.
    assert not torch.allclose(out, build_model(tiny_config(**MIXER_CASES[case]), SEED)(ids))


def mixer_inputs_with_perturbation(model, ids: torch.Tensor, module_index: int, delta: float) -> list[torch.Tensor]:
    """Inputs of every sub-module (in order) when sub-module `module_index`'s output is shifted by delta."""
    mixers = [m for block in model.layers.values() for m in (block.token_mixer, block.channel_mixer)]
    seen: list[torch.Tensor] = []
    handles = [m.register_forward_hook(lambda mod, args, out: seen.append(args[0].detach().clone()))
               for m in mixers]

    def shift(module, args, out):
        shifted = complete(out) + delta
        return PendingTensor.completed(shifted) if isinstance(out, PendingTensor) else shifted

    handles.append(mixers[module_index].register_forward_hook(shift))
    try:
        with torch.no_grad():
            model(ids)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("j", [1, 2, 3])
def test_perturbing_a_module_output_skips_the_next_module_and_reaches_the_one_after(j):
    """f_{j-1}'s output does not reach f_j's input, but does reach f_{j+1}'s (0-based module j-1 = index j-1)."""
    model = build_model(tiny_config(residual="ladder"), SEED)
    ids = tokens()
    clean = mixer_inputs_with_perturbation(model, ids, j - 1, 0.0)
    shifted = mixer_inputs_with_perturbation(model, ids, j - 1, 0.5)
    assert torch.equal(clean[j], shifted[j]), "f_j must not see f_{j-1}'s output"
    assert not torch.allclose(clean[j + 1], shifted[j + 1]), "f_{j+1} must see f_{j-1}'s output"


def test_standard_model_feeds_the_next_module_for_contrast():
    model = build_model(tiny_config(), SEED)
    ids = tokens()
    clean = mixer_inputs_with_perturbation(model, ids, 0, 0.0)
    shifted = mixer_inputs_with_perturbation(model, ids, 0, 0.5)
    assert not torch.allclose(clean[1], shifted[1])


def test_hybrid_converts_only_the_last_layers():
    cfg = tiny_config(num_layers=4, residual="ladder", ladder_layers=2)
    assert [s.residual for s in layer_specs(cfg)] == ["standard", "standard", "ladder", "ladder"]
    assert first_ladder_layer(cfg) == 2 and ladder_run_starts(cfg) == [2]
    ids = tokens()
    model = build_model(cfg, SEED)
    # The first two layers are the standard model's: their output feeds a ladder run over layers 2-3.
    standard = build_model(tiny_config(num_layers=4), SEED)
    hidden = standard.embedding(ids)
    for key in ("0", "1"):
        hidden = standard.layers[key](hidden)
    streams = [hidden, hidden]
    for key in ("2", "3"):
        block = model.layers[key]
        for norm, mixer, positions in ((block.token_mixer_norm, block.token_mixer, True),
                                       (block.channel_mixer_norm, block.channel_mixer, False)):
            out = complete(mixer(norm(streams[-2]), None) if positions else mixer(norm(streams[-2])))
            streams.append(streams[-1] + out)
    torch.testing.assert_close(model(ids), model.output(model.norm(streams[-1])), rtol=1e-5, atol=1e-6)


def test_pipeline_chunks_split_at_a_restart_compose_to_the_whole_model():
    """A stage boundary completes the stream; with the boundary declared a restart, the chunks
    together compute exactly the one-process model (what a pipeline relies on)."""
    cfg = tiny_config(num_layers=4, residual="ladder", ladder_restarts=[2])
    ids = tokens()
    whole = build_model(cfg, SEED)
    first = build_model(cfg, SEED, layer_ids=[0, 1], has_head=False)
    second = build_model(cfg, SEED, layer_ids=[2, 3], has_embedding=False)
    assert torch.equal(second(first(ids)), whole(ids))
    no_restart = build_model(tiny_config(num_layers=4, residual="ladder"), SEED)
    assert not torch.allclose(no_restart(ids), whole(ids))


def test_a_chunk_starting_inside_a_ladder_run_is_refused():
    cfg = tiny_config(num_layers=4, residual="ladder")
    with pytest.raises(ValueError, match="ladder_restarts"):
        build_model(cfg, SEED, layer_ids=[2, 3], has_embedding=False)


def test_ladder_keeps_bf16_parameters_in_bf16():
    model = build_model(tiny_config(residual="ladder"), SEED, dtype=torch.bfloat16)
    out = model(tokens())
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
    out.float().square().mean().backward()
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters() if p.grad is not None)


def test_ladder_block_alone_is_a_one_layer_run():
    cfg = tiny_config(num_layers=1, residual="ladder")
    model = build_model(cfg, SEED)
    ids = tokens()
    block = model.layers["0"]
    torch.testing.assert_close(model.output(model.norm(block(model.embedding(ids)))), model(ids))
