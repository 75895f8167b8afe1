"""Config composition (Hydra + structured schema) and the cross-field validation rules."""
from __future__ import annotations

import pytest
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf.errors import ConfigKeyError, ValidationError

from trainer.config import Config, compose
from trainer.validation import ConfigError, validate


def test_default_and_quickstart_compose_to_typed_dataclasses():
    cfg = compose()
    assert isinstance(cfg, Config)
    validate(cfg)
    q = compose(["+experiment=quickstart"])
    assert q.name == "quickstart" and q.trainer.max_steps == 200 and q.data.seq_len == 256
    validate(q)


def test_overrides_reach_their_components():
    cfg = compose(["optim.lr=1e-3", "model=llama_small", "data.global_batch_size=64", "trainer.precision=bf16"])
    assert cfg.optim.lr == 1e-3 and cfg.model.hidden_size == 768 and cfg.data.global_batch_size == 64
    assert cfg.trainer.precision == "bf16"


def test_hybrid_stack_is_expressible():
    cfg = compose(["model.num_layers=8", "model.token_mixers=[attention,attention,attention,attention]"])
    assert list(cfg.model.token_mixers) == ["attention"] * 4


def test_unknown_key_names_the_key():
    with pytest.raises(ConfigCompositionException) as e:
        compose(["model.hiden_size=3"])
    assert "hiden_size" in str(e.value.__cause__ or e.value)


def test_wrong_type_names_the_key():
    with pytest.raises((ConfigCompositionException, ValidationError)) as e:
        compose(["model.hidden_size=big"])
    text = str(e.value) + str(e.value.__cause__)
    assert "hidden_size" in text and "big" in text


def test_unknown_key_appended_with_plus_is_rejected():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)) as e:
        compose(["+trainer.max_stepz=3"])
    assert "max_stepz" in str(e.value) + str(e.value.__cause__)


def test_unknown_experiment_lists_available_ones():
    with pytest.raises(MissingConfigException) as e:
        compose(["+experiment=nope"])
    assert "quickstart" in str(e.value)


def _bad(overrides: list[str], world_size: int = 1) -> ConfigError:
    cfg = compose(overrides)
    with pytest.raises(ConfigError) as e:
        validate(cfg, world_size)
    return e.value


# (overrides, world size, field named, a fragment of the problem, a fragment of the fix)
BAD_CONFIGS = [
    (["model.hidden_size=250", "model.num_heads=8"], 1, "model.hidden_size", "not divisible by model.num_heads=8",
     "multiple of 8"),
    (["model.num_heads=8", "model.num_kv_heads=3"], 1, "model.num_kv_heads", "must be a multiple of it",
     "divisor of 8"),
    (["model.hidden_size=24", "model.num_heads=8"], 1, "model.num_heads", "odd head dim 3", "even"),
    (["data.seq_len=2048", "model.max_position_embeddings=1024"], 1, "data.seq_len",
     "exceeds model.max_position_embeddings=1024", "raise model.max_position_embeddings"),
    (["data.global_batch_size=20", "data.micro_batch_size=8"], 1, "data.global_batch_size",
     "not divisible by micro_batch_size * dp = 8 * 1", "multiple of 8"),
    (["data.global_batch_size=16", "data.micro_batch_size=8"], 4, "data.global_batch_size",
     "micro_batch_size * dp = 8 * 4", "multiple of 32"),
    (["trainer.max_steps=100", "optim.schedule.warmup_steps=100"], 1, "optim.schedule.warmup_steps",
     "smaller than trainer.max_steps=100", "fewer warmup steps"),
    (["trainer.max_steps=100", "optim.schedule.warmup_steps=10", "optim.schedule.decay_steps=95"], 1,
     "optim.schedule.decay_steps", "exceeds trainer.max_steps=100", "shorten decay_steps"),
    (["optim.schedule.name=exponential"], 1, "optim.schedule.name", "must be one of", "cosine"),
    (["trainer.precision=fp8"], 1, "trainer.precision", "must be one of", "bf16"),
    (["model.token_mixers=[attention,mamba]"], 1, "model.token_mixers", "'mamba' is not an available layer",
     "attention"),
    (["model.channel_mixers=[moe]", "model.moe.num_experts=6", "parallel.ep=4"], 4, "model.moe.num_experts",
     "not divisible by parallel.ep=4", "multiple of 4"),
    (["model.channel_mixers=[moe]", "model.moe.num_experts=4", "model.moe.topk=5"], 1, "model.moe.topk",
     "more than num_experts=4", "topk <= 4"),
    (["model.channel_mixers=[moe]", "model.moe.n_group=2"], 1, "model.moe.topk_group",
     "must be set together", "set both"),
    (["model.channel_mixers=[moe]", "model.moe.aux_free_bias_rate=0.001"], 1, "model.moe.aux_free_bias_rate",
     "needs score_function='sigmoid'", "score_function=sigmoid"),
    (["model.channel_mixers=[moe]", "parallel.tp=2", "data.micro_batch_size=1", "data.seq_len=31",
      "model.max_position_embeddings=64"], 2, "data.micro_batch_size", "do not split over parallel.tp=2",
     "sequence_parallel=true"),
    (["parallel.cp=2", "data.seq_len=30"], 2, "data.seq_len", "not a multiple of 2 * parallel.cp = 4",
     "multiple of 4"),
    (["parallel.cp=2", "model.token_mixers=[gla,attention]"], 2, "model.token_mixers",
     "context parallelism is implemented for attention only", "parallel.cp=1"),
    (["parallel.cp=2", "model.attention_dropout=0.1"], 2, "model.attention_dropout", "not supported with parallel.cp=2",
     "attention_dropout=0"),
    (["parallel.cp=4", "parallel.cp_comm=a2a", "model.num_heads=2", "model.num_kv_heads=2",
      "model.hidden_size=64"], 4, "model.num_heads", "do not split over parallel.cp=4", "parallel.cp_comm=ring"),
    (["parallel.tp=8", "model.hidden_size=36", "model.num_heads=2", "model.num_kv_heads=2"], 8, "model.hidden_size",
     "not divisible by parallel.tp=8", "choose a tp dividing 36"),
    (["parallel.tp=4", "model.hidden_size=64", "model.num_heads=2", "model.num_kv_heads=2"], 4, "model.num_heads",
     "not divisible by parallel.tp=4", "tp dividing 2"),
    (["parallel.tp=4", "model.hidden_size=96", "model.num_heads=12", "model.num_kv_heads=6"], 4,
     "model.num_kv_heads", "neither divides nor is a multiple of parallel.tp=4", "a multiple of it"),
    (["parallel.tp=2", "model.ffn_hidden_size=63"], 2, "model.ffn_hidden_size", "MLP inner width",
     "multiple of 2"),
    (["parallel.tp=2", "parallel.sequence_parallel=true", "data.seq_len=63"], 2, "data.seq_len",
     "split over TP by sequence parallelism", "parallel.sequence_parallel=false"),
    (["parallel.tp=4", "model.token_mixers=[gla]", "model.gla.num_heads=2"], 4, "model.gla.num_heads",
     "GLA heads (split over TP)", "multiple of 4"),
    (["parallel.tp=4", "model.token_mixers=[pararnn_gru]", "model.pararnn.state_size=30"], 4,
     "model.pararnn.state_size", "ParaRNN state width", "multiple of 4"),
    (["parallel.pp=2", "model.num_layers=3"], 2, "model.num_layers", "does not split evenly over parallel.pp",
     "parallel.pipeline_layers"),
    (["parallel.pp=2", "model.num_layers=3", "parallel.pipeline_layers=[1,1]"], 2, "parallel.pipeline_layers",
     "summing to model.num_layers=3", "list 2 layer counts"),
    (["parallel.pp=2", "parallel.vpp=2", "model.num_layers=4", "data.global_batch_size=2",
      "data.micro_batch_size=2"], 2, "data.global_batch_size", "interleaved schedule cannot run",
     "multiple of parallel.pp=2"),
    (["parallel.sequence_parallel=true"], 2, "parallel.sequence_parallel", "shards over tensor-parallel ranks",
     "parallel.tp>1"),
    (["parallel.dp=3"], 2, "parallel.dp", "world size is 2", "leave parallel.dp null"),
    (["parallel.tp=3"], 4, "parallel.tp", "does not divide world / pp = 4 / 1 = 4", "use one of [1, 2, 4]"),
    (["parallel.order=tp-cp-ep-dp-dp"], 1, "parallel.order", "", "tp"),
    (["optim.lr=0"], 1, "optim.lr", "must be positive", "> 0"),
    (["optim.fused=true", "optim.foreach=true"], 1, "optim.fused", "cannot be combined with optim.foreach=true",
     "optim.foreach=null"),
    (["optim.overlap_param_gather=true"], 1, "optim.overlap_param_gather", "distributed optimizer",
     "optim.distributed=true"),
    (["trainer.resume=/definitely/not/here"], 1, "trainer.resume", "does not exist", "existing"),
    (["trainer.resume=auto"], 1, "trainer.resume", "run_dir, which is null", "set trainer.run_dir"),
    (["data.val_fraction=0"], 1, "data.val_fraction", "must lie in (0, 1)", "0.05"),
    (["model.dropout=1.5"], 1, "model.dropout", "must lie in [0, 1)", "0.1"),
    (["model.kernels.backend=cuda"], 1, "model.kernels.backend", "must be one of", "triton"),
    (["logger.backend=mlflow"], 1, "logger.backend", "must be one of", "wandb"),
    (["data.source=text_files"], 1, "data.paths", "needs input files", ".jsonl"),
    (["model.token_mixers=[pararnn_gru]", "model.pararnn.newton_iterations=0"], 1,
     "model.pararnn.newton_iterations", "must be at least 1", "use 3"),
    (["model.token_mixers=[gla]", "model.gla.num_heads=3"], 1, "model.gla.expand_k",
     "not divisible by the 3 GLA heads", "model.gla.num_heads"),
    # A MoE model's dense layers (first_k_dense_layers) and shared experts are split over TP too.
    (["model.channel_mixers=[moe]", "model.moe.first_k_dense_layers=1", "model.ffn_hidden_size=33",
      "parallel.tp=2"], 2, "model.ffn_hidden_size", "the MLP inner width (the dense layers of the MoE model)",
     "multiple of 2"),
    (["model.channel_mixers=[moe]", "model.moe.num_shared_experts=1", "model.moe.shared_ffn_hidden_size=33",
      "parallel.tp=2"], 2, "model.moe.shared_ffn_hidden_size", "not divisible by parallel.tp=2", "multiple of 2"),
]


@pytest.mark.parametrize("overrides,world,field,problem,fix", BAD_CONFIGS,
                         ids=[c[2] + ":" + c[0][-1] for c in BAD_CONFIGS])
def test_bad_config_names_field_value_and_fix(overrides, world, field, problem, fix):
    err = _bad(overrides, world)
    message = str(err)
    assert message.startswith(field + "="), message
    assert problem in message and "Fix:" in message and fix in message.split("Fix:")[1], message


def test_validation_runs_before_anything_is_built(tmp_path, monkeypatch):
    """A bad config must fail before the tokenizer, data, model or run directory is touched."""
    import trainer.trainer as tr

    def boom(*a, **k):
        raise AssertionError("built something before validation")

    monkeypatch.setattr(tr, "load_tokenizer", boom)
    monkeypatch.setattr(tr, "build_model", boom)
    monkeypatch.setattr(tr, "prepare", boom)
    cfg = compose(["model.num_kv_heads=3", f"trainer.run_dir={tmp_path}/run"])
    with pytest.raises(ConfigError):
        tr.Trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_text_files_paths_accept_globs_and_reject_missing_files(tmp_path):
    (tmp_path / "a.txt").write_text("hello")
    validate(compose(["data=text_files", f"data.paths=[{tmp_path}/*.txt]"]))
    err = _bad(["data=text_files", f"data.paths=[{tmp_path}/missing.txt]"])
    assert "data.paths" in str(err) and "missing.txt" in str(err) and "is not a file" in str(err)
