"""Bad decode requests fail before any work with one error naming the option, the value and a fix
(models/inference/check.py, launch/generate.py)."""
from __future__ import annotations

import pytest

from launch.generate import parse_args
from models import ModelConfig
from models.config import MLAConfig
from models.inference.check import check_decode
from models.inference.config import DecodeConfig, SamplingConfig, TPLAConfig


def mla(**overrides) -> ModelConfig:
    fields = {"vocab_size": 64, "hidden_size": 32, "num_layers": 2, "num_heads": 4, "token_mixers": ["mla"],
              "max_position_embeddings": 32,
              "mla": MLAConfig(kv_lora_rank=12, qk_nope_head_dim=4, qk_rope_head_dim=4, v_head_dim=4)}
    fields.update(overrides)
    return ModelConfig(**fields)


def tpla(**fields) -> DecodeConfig:
    return DecodeConfig(max_new_tokens=4, tpla=TPLAConfig(enabled=True, **fields))


@pytest.mark.parametrize("model, cfg, tp, message", [
    (mla(token_mixers=["attention"]), tpla(), 2, r"--tpla needs a model with MLA layers .*\['attention'\]"),
    (mla(), tpla(), 8, r"model.mla.kv_lora_rank=12 .* not divisible by g=8"),
    (mla(), tpla(degree=8), 1, r"kv_lora_rank=12 .* g=8"),
    (mla(num_heads=6, hidden_size=36), tpla(), 4, r"model.num_heads=6 is not divisible by g=4"),
    (mla(), tpla(degree=2), 4, r"--tpla-degree=2 under tp=4"),
    (mla(), tpla(transform="hadamard"), 2, r"hadamard needs a power-of-two latent, model.mla.kv_lora_rank=12"),
    (mla(), tpla(transform="svd"), 2, r"--tpla-transform='svd': available none, hadamard, pca"),
    (mla(residual="ladder"), tpla(), 2, r"model.residual=ladder is not supported"),
    (mla(), tpla(latent_norm="layer"), 2, r"--tpla-latent-norm='layer': available slice, full"),
], ids=["not-mla", "latent-vs-tp", "latent-vs-degree", "heads", "degree-vs-tp", "hadamard-size", "transform",
        "ladder", "latent-norm"])
def test_tpla_refuses_what_it_cannot_run(model, cfg, tp, message):
    with pytest.raises(ValueError, match=message):
        check_decode(model, cfg, prompt_length=3, tp=tp)


def test_positions_and_sampling_settings_are_checked():
    model = mla()
    with pytest.raises(ValueError, match=r"prompt is 40 tokens, longer than the model's positions "
                                         r"\(model.max_position_embeddings=32\)"):
        check_decode(model, DecodeConfig(max_new_tokens=1), prompt_length=40)
    with pytest.raises(ValueError, match=r"--max-new-tokens=10 exceeds .* use --max-new-tokens <= 2"):
        check_decode(model, DecodeConfig(max_new_tokens=10), prompt_length=30)
    with pytest.raises(ValueError, match=r"--top-p=0.0"):
        check_decode(model, DecodeConfig(sampling=SamplingConfig(temperature=1.0, top_p=0.0)), prompt_length=3)
    with pytest.raises(ValueError, match=r"--temperature=-1"):
        check_decode(model, DecodeConfig(sampling=SamplingConfig(temperature=-1)), prompt_length=3)
    check_decode(model, tpla(transform="pca"), prompt_length=3, tp=2)  # a valid request passes
    check_decode(mla(token_mixers=["attention"]), DecodeConfig(max_new_tokens=4), prompt_length=3)


def test_command_line_builds_the_decode_config():
    args, cfg = parse_args(["runs/x", "--tpla", "--tpla-transform", "pca", "--temperature", "0.7", "--top-p", "0.9"])
    assert args.checkpoint == "runs/x"
    assert cfg.tpla == TPLAConfig(enabled=True, transform="pca")
    assert cfg.sampling == SamplingConfig(temperature=0.7, top_p=0.9)
    with pytest.raises(SystemExit):
        parse_args(["runs/x", "--run-dir", "runs/y"])


@pytest.mark.parametrize("argv, message", [
    (["--tpla"], r"--tpla needs a model with MLA layers .*\['attention'\]"),
    (["--prompt", "ROMEO: " * 200], r"the prompt is 1001 tokens, longer than the model's positions \(model.max_position_embeddings=256\)"),
], ids=["tpla-on-attention", "long-prompt"])
def test_generate_refuses_before_loading_weights(tmp_path, capsys, argv, message):
    """A checkpoint directory with no tensors at all: the errors come from its config alone."""
    from launch.generate import main
    from trainer.checkpoint import CONFIG_FILE, META_FILE
    from trainer.config import compose, to_yaml

    cfg = compose(["+experiment=quickstart", "model.max_position_embeddings=256"])
    cfg.model.vocab_size = 4096
    (tmp_path / CONFIG_FILE).write_text(to_yaml(cfg))
    (tmp_path / META_FILE).write_text("{}")
    with pytest.raises(SystemExit, match=r"^foldtron: error: " + message):
        main([str(tmp_path), *argv])
