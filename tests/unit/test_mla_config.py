"""Validation of the MLA settings (`model.mla.*`, `model.rope_scaling.*`) and the MLA experiments.

Each bad setting fails before anything is built with one ConfigError naming the field, its value,
the problem and a fix (models/check.py)."""
from __future__ import annotations

import pytest
import torch

from models.layers.mla import MultiHeadLatentAttention
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from parallel_state.groups import AxisGroup
from trainer.config import compose
from trainer.validation import ConfigError, validate

MLA = ["model.token_mixers=[mla]"]
YARN = ["model.rope_scaling.type=yarn", "model.rope_scaling.factor=4"]

# (overrides, world size, field named, a fragment of the problem, a fragment of the fix)
BAD_CONFIGS = [
    ([*MLA, "parallel.tp=4", "model.hidden_size=96", "model.num_heads=6", "model.num_kv_heads=null"], 4,
     "model.num_heads", "not divisible by parallel.tp=4", "tp dividing 6"),
    ([*MLA, "model.mla.qk_rope_head_dim=5"], 1, "model.mla.qk_rope_head_dim", "is odd", "even width"),
    ([*MLA, "model.mla.kv_lora_rank=0"], 1, "model.mla.kv_lora_rank", "must be positive", "> 0"),
    ([*MLA, "model.mla.q_lora_rank=-1"], 1, "model.mla.q_lora_rank", "must be >= 0", "use 0"),
    ([*MLA, *YARN], 1, "model.rope_scaling.original_max_position_embeddings",
     "needs the context length of the pretraining", "model.rope_scaling.type=null"),
    ([*MLA, *YARN, "model.rope_scaling.original_max_position_embeddings=1024", "model.rope_scaling.factor=0.5"], 1,
     "model.rope_scaling.factor", "must be >= 1", "max_position_embeddings"),
    ([*MLA, "model.rope_scaling.type=ntk"], 1, "model.rope_scaling.type", "must be one of", "yarn"),
    ([*YARN, "model.rope_scaling.original_max_position_embeddings=1024"], 1, "model.rope_scaling.type",
     "implemented for the mla token mixer", "token_mixers=[mla]"),
    ([*MLA, "parallel.cp=2", "model.attention_dropout=0.1"], 2, "model.attention_dropout",
     "not supported with parallel.cp=2", "attention_dropout=0"),
    ([*MLA, "parallel.cp=4", "parallel.cp_comm=a2a", "model.num_heads=2", "model.num_kv_heads=null",
      "model.hidden_size=64"], 4, "model.num_heads", "do not split over parallel.cp=4", "parallel.cp_comm=ring"),
]


@pytest.mark.parametrize("overrides,world,field,problem,fix", BAD_CONFIGS,
                         ids=[f"{c[2]}-{i}" for i, c in enumerate(BAD_CONFIGS)])
def test_bad_mla_setting_names_field_value_and_fix(overrides, world, field, problem, fix):
    with pytest.raises(ConfigError) as e:
        validate(compose(overrides), world)
    assert e.value.field == field, str(e.value)
    assert problem in e.value.problem and fix in e.value.fix, str(e.value)


def test_mla_is_accepted_under_context_parallelism_and_yarn():
    validate(compose([*MLA, "parallel.cp=2", "parallel.cp_comm=ring"]), 2)
    validate(compose([*MLA, "parallel.cp=2", "parallel.cp_comm=a2a", "model.num_kv_heads=3", "model.num_heads=6",
                      "model.hidden_size=96"]), 2)  # K/V heads are MLA's own: num_kv_heads plays no part
    validate(compose([*MLA, *YARN, "model.rope_scaling.original_max_position_embeddings=1024"]), 1)


def test_the_layer_itself_refuses_heads_tp_does_not_divide():
    cfg = compose([*MLA, "model.num_heads=6", "model.hidden_size=96"]).model
    with pytest.raises(ValueError, match="model.num_heads=6 is not divisible by tensor-parallel size 4"), \
            torch.device("meta"):
        # A TP group of 4 that is never communicated over (construction only).
        MultiHeadLatentAttention(cfg, ParallelContext(tp=TPContext(AxisGroup("tp", None, (0, 1, 2, 3), 0))))


@pytest.mark.parametrize("name,world", [("mla_quickstart", 1), ("mla_moe_quickstart", 8)])
def test_mla_experiments_compose_and_validate(name, world):
    cfg = compose([f"+experiment={name}"])
    validate(cfg, world)
    assert list(cfg.model.token_mixers) == ["mla"]
    if name == "mla_moe_quickstart":
        moe = cfg.model.moe
        assert (moe.score_function, moe.n_group, moe.topk_group, moe.num_shared_experts) == ("sigmoid", 4, 2, 1)
        assert moe.first_k_dense_layers == 1 and moe.aux_free_bias_rate > 0 and moe.seq_aux_loss_coeff > 0
        validate(compose([f"+experiment={name}", "parallel.tp=1", "parallel.cp=1", "parallel.pp=1",
                          "parallel.ep=1", "parallel.sequence_parallel=false"]), 1)
