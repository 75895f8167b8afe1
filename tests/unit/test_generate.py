"""launch/generate.py: greedy decoding with caches equals recomputing the whole sequence each step."""
from __future__ import annotations

import pytest
import torch

from launch.generate import greedy_generate, greedy_generate_uncached
from models import ModelConfig, build_model
from models.config import ParaRNNConfig

VOCAB = 61
CASES = {
    "attention": {},
    "gla": {"token_mixers": ["gla"]},
    "pararnn_gru": {"token_mixers": ["pararnn_gru"], "pararnn": ParaRNNConfig(mode="sequential")},
    "pararnn_lstm+attention": {"token_mixers": ["pararnn_lstm", "attention"],
                               "pararnn": ParaRNNConfig(mode="sequential")},
    "attention ladder": {"residual": "ladder"},
    "gla+attention hybrid ladder": {"token_mixers": ["gla", "attention"], "residual": "ladder", "ladder_layers": 1},
}


def tiny_model(**overrides):
    fields = {"vocab_size": VOCAB, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "num_kv_heads": 2,
              "ffn_hidden_size": 48, "max_position_embeddings": 64}
    fields.update(overrides)
    return build_model(ModelConfig(**fields), seed=7).eval()


@pytest.mark.parametrize("case", list(CASES))
def test_cached_greedy_decoding_matches_recomputing_the_full_forward(case):
    model = tiny_model(**CASES[case])
    prompt = torch.randint(0, VOCAB, (2, 5), generator=torch.Generator().manual_seed(3))
    cached = greedy_generate(model, prompt, max_new_tokens=6)
    full = greedy_generate_uncached(model, prompt, max_new_tokens=6)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.tokens.shape == (2, 11) and torch.equal(cached.tokens[:, :5], prompt)
    for step, (a, b) in enumerate(zip(cached.step_logits, full.step_logits)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, s=step: f"step {s}: {m}")


def test_load_model_reads_a_trained_run(tmp_path):
    from launch.generate import load_model
    from tests.conftest import tiny_overrides
    from trainer.config import compose
    from trainer.trainer import Trainer

    overrides = tiny_overrides(tmp_path, steps=2) + ["model.residual=ladder", "optim.schedule.warmup_steps=0"]
    trainer = Trainer(compose(overrides))
    trainer.train()
    model, cfg = load_model(str(tmp_path / "run"))
    assert cfg.model.residual == "ladder"
    trained = dict(trainer.model.named_parameters())
    for name, param in model.named_parameters():
        assert torch.equal(param, trained[name]), name
    prompt = torch.tensor([[1, 2, 3]])
    assert torch.equal(greedy_generate(model, prompt, 4).tokens,
                       greedy_generate_uncached(trainer.model.eval(), prompt, 4).tokens)
