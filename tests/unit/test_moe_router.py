"""MoE routing rules against hand-computed examples (docs/moe.md)."""
from __future__ import annotations

import math

import pytest
import torch

from moe.config import MoEConfig, check
from moe.router import (
    Router,
    apply_capacity,
    capacity_of,
    group_limited_mask,
    load_imbalance,
    select_topk,
    seq_aux_sum,
    switch_aux_sum,
    z_loss_sum,
)
from parallel_state import ConfigError, Topology


def identity_router(**overrides) -> Router:
    """A router whose logits are the input itself (W_r = I), so tests write logits directly."""
    cfg = MoEConfig(**{"num_experts": 4, "topk": 2, **overrides})
    router = Router(cfg, hidden_size=cfg.num_experts, init_std=0.02)
    with torch.no_grad():
        router.weight.copy_(torch.eye(cfg.num_experts))
        if router.norm_weight is not None:
            router.norm_weight.fill_(1.0)
    router.reset_buffers()
    return router


def test_softmax_then_topk_uses_unnormalised_probabilities():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    r = identity_router()(logits)
    p = torch.softmax(logits[0], 0)
    assert r.expert.tolist() == [[1, 2]]
    torch.testing.assert_close(r.weight[0], torch.stack([p[1], p[2]]))
    assert r.active.all()


def test_topk_then_softmax_normalises_over_the_k_logits():
    r = identity_router(topk_then_softmax=True)(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
    e = math.exp(1.0)
    assert r.expert.tolist() == [[1, 2]]
    torch.testing.assert_close(r.weight[0], torch.tensor([e / (e + 1), 1 / (e + 1)]))


def test_sigmoid_weights_renormalised_over_the_choices():
    r = identity_router(score_function="sigmoid")(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
    s3, s2 = 1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-2))
    torch.testing.assert_close(r.weight[0], torch.tensor([s3 / (s3 + s2), s2 / (s3 + s2)]))


def test_group_limited_keeps_the_groups_with_the_best_top2_sums():
    # 4 groups of 2 experts; group sums of top-2: 0.9, 0.99, 0.9, 1.1 -> keep groups 3 and 1.
    scores = torch.tensor([[0.9, 0.0, 0.5, 0.49, 0.45, 0.45, 0.8, 0.3]])
    mask = group_limited_mask(scores, n_group=4, topk_group=2)
    assert mask.tolist() == [[False, False, True, True, False, False, True, True]]
    assert sorted(select_topk(scores, 2, n_group=4, topk_group=2)[0].tolist()) == [2, 6]
    assert sorted(select_topk(scores, 2)[0].tolist()) == [0, 6]  # unrestricted: the global top-2


def test_aux_free_bias_changes_selection_not_weights():
    router = identity_router(score_function="sigmoid", aux_free_bias_rate=0.1, topk=1)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    assert router(logits).expert.tolist() == [[0]]
    router.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))  # sigmoid(1)+0.5 > sigmoid(2)
    r = router(logits)
    assert r.expert.tolist() == [[1]]
    torch.testing.assert_close(r.weight, torch.ones(1, 1))  # k=1: renormalised weight is 1, bias-free


def test_balance_loss_experts_ignore_the_aux_free_bias():
    """f_e counts the unbiased top-k (DeepSeek-V3): the bias moves the computed expert, not aux_expert."""
    router = identity_router(score_function="sigmoid", aux_free_bias_rate=0.1, topk=1)
    router.expert_bias.copy_(torch.tensor([0.0, 0.5, 0.0, 0.0]))
    r = router(torch.tensor([[2.0, 1.0, 0.0, -1.0]]))
    assert r.expert.tolist() == [[1]]
    assert r.aux_expert.tolist() == [[0]]


def test_balance_loss_experts_ignore_the_group_limit():
    # Groups of 2: top-2 sums 0.91, 1.0, 0.89, 0.02 keep group 1 only, so the computed top-2 is {2, 3};
    # the plain top-2 over all experts is {0, 2}.
    router = identity_router(num_experts=8, score_function="softmax", n_group=4, topk_group=1)
    probs = torch.tensor([[0.9, 0.01, 0.55, 0.45, 0.45, 0.44, 0.01, 0.01]])
    r = router(probs.log())
    assert sorted(r.expert[0].tolist()) == [2, 3]
    assert sorted(r.aux_expert[0].tolist()) == [0, 2]


def test_balance_loss_experts_are_the_selection_without_bias_or_groups():
    r = identity_router(topk=2)(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.1, 0.2, 5.0]]))
    assert r.aux_expert is r.expert


def test_aux_free_bias_update_is_rate_times_sign_of_load_error():
    router = identity_router(score_function="sigmoid", aux_free_bias_rate=0.1)
    router.tokens_per_expert.fill_(3.0)
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))  # mean 5
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.1, 0.1, 0.0, 0.0]))
    assert router.tokens_per_expert.sum() == 0  # counting restarts for the next global batch
    router.update_bias(torch.tensor([10.0, 0.0, 5.0, 5.0]))
    torch.testing.assert_close(router.expert_bias, torch.tensor([-0.2, 0.2, 0.0, 0.0]))


def test_router_counts_selected_slots_in_training_only():
    router = identity_router()
    router.train()
    router(torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.0]]))
    assert router.tokens_per_expert.tolist() == [0.0, 1.0, 2.0, 1.0]
    router.eval()
    router(torch.tensor([[1.0, 3.0, 2.0, 0.0]]))
    assert router.tokens_per_expert.tolist() == [0.0, 1.0, 2.0, 1.0]


def test_blockffn_router_is_rmsnorm_of_relu_without_topk():
    r = identity_router(router="blockffn")(torch.tensor([[2.0, -1.0, 0.0, 1.0]]))
    rms = math.sqrt((4 + 1) / 4 + 1e-6)
    torch.testing.assert_close(r.weight[0], torch.tensor([2 / rms, 0.0, 0.0, 1 / rms]))
    assert r.active.tolist() == [[True, False, False, True]]
    assert r.expert.tolist() == [[0, 1, 2, 3]]


def test_capacity_formula():
    assert capacity_of(5, 2, 4, 1.0) == 3  # ceil(2.5)
    assert capacity_of(8, 2, 4, 1.0) == 4
    assert capacity_of(8, 2, 4, 1.25) == 5


def test_capacity_drops_lowest_probability():
    expert = torch.tensor([[0], [0], [0], [0], [1]])
    weight = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.2]])
    active = torch.ones_like(expert, dtype=torch.bool)
    kept = apply_capacity(expert, weight, active, num_experts=2, capacity=2, policy="probs")
    assert kept[:, 0].tolist() == [False, True, False, True, True]


def test_capacity_drops_latest_position():
    expert = torch.tensor([[0], [0], [0], [0], [1]])
    weight = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.2]])
    active = torch.ones_like(expert, dtype=torch.bool)
    kept = apply_capacity(expert, weight, active, num_experts=2, capacity=2, policy="position")
    assert kept[:, 0].tolist() == [True, True, False, False, True]


def test_capacity_position_order_is_token_then_choice_and_ignores_inactive_slots():
    # Expert 2 is chosen by token 0 (2nd choice), token 1 (1st choice), token 2 (inactive), token 3.
    expert = torch.tensor([[0, 2], [2, 1], [2, 0], [1, 2]])
    weight = torch.tensor([[0.5, 0.5], [0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    active = torch.tensor([[True, True], [True, True], [False, True], [True, True]])
    kept = apply_capacity(expert, weight, active, num_experts=3, capacity=2, policy="position")
    assert kept.tolist() == [[True, True], [True, True], [False, True], [True, False]]
    kept = apply_capacity(expert, weight, active, num_experts=3, capacity=2, policy="probs")
    # expert 2 weights: t0 0.5, t1 0.9, t3 0.6 -> drop t0; equal weights elsewhere keep the earlier slot.
    assert kept.tolist() == [[True, False], [True, True], [False, True], [True, True]]
    kept = apply_capacity(expert, weight, active, num_experts=3, capacity=1, policy="probs")
    # expert 0: t0 0.5 vs t2 0.1; expert 1: t1 0.1 vs t3 0.4; expert 2: t1 0.9 wins.
    assert kept.tolist() == [[True, False], [True, False], [False, False], [True, False]]


def test_switch_aux_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6]])
    counts = torch.tensor([1.0, 1.0])  # token 0 -> expert 0, token 1 -> expert 1 (k=1)
    # f = [0.5, 0.5], P = [0.55, 0.45]: loss = 2 * (0.5*0.55 + 0.5*0.45) = 1.0; times 2 tokens.
    torch.testing.assert_close(switch_aux_sum(probs, counts, total_slots=2.0), torch.tensor(2.0))
    counts = torch.tensor([2.0, 0.0])  # both to expert 0: loss = 2 * 0.55 = 1.1
    torch.testing.assert_close(switch_aux_sum(probs, counts, total_slots=2.0), torch.tensor(2.2))


def test_seq_aux_loss_is_per_sequence_then_averaged():
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.2, 0.8], [0.1, 0.9]])
    seq = torch.tensor([0, 0, 1, 1])
    seq_counts = torch.tensor([[2.0, 0.0], [0.0, 2.0]])  # k=1
    # seq 0: 2 * (1 * 0.55) = 1.1; seq 1: 2 * (1 * 0.85) = 1.7; mean 1.4; times 4 tokens.
    torch.testing.assert_close(seq_aux_sum(probs, seq, seq_counts, k=1), torch.tensor(5.6))


def test_z_loss_is_mean_squared_logsumexp_times_tokens():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = math.log(2) ** 2 + math.log(math.e + math.e ** 2) ** 2
    torch.testing.assert_close(z_loss_sum(logits), torch.tensor(expected))


def test_load_imbalance():
    assert load_imbalance(torch.tensor([4, 4, 4, 4])) == 1.0
    assert load_imbalance(torch.tensor([8, 0, 4, 4])) == 2.0
    assert load_imbalance(torch.tensor([0, 0])) == 1.0


@pytest.mark.parametrize("overrides, field", [
    ({"num_experts": 6}, "num_experts"),  # with ep=4
    ({"topk": 9}, "topk"),
    ({"n_group": 4}, "topk_group"),  # the missing partner is named
    ({"n_group": 3, "topk_group": 1}, "n_group"),
    ({"n_group": 4, "topk_group": 5}, "topk_group"),
    ({"n_group": 4, "topk_group": 1, "topk": 3}, "topk"),
    ({"aux_free_bias_rate": 0.01}, "aux_free_bias_rate"),
    ({"topk_then_softmax": True, "score_function": "sigmoid"}, "topk_then_softmax"),
    ({"capacity_factor": 0.0}, "capacity_factor"),
    ({"pad_to_capacity": True}, "pad_to_capacity"),
    ({"dispatcher": "ring"}, "dispatcher"),
    ({"router": "blockffn", "aux_loss_coeff": 0.01}, "aux_loss_coeff"),
])
def test_check_names_field_value_and_fix(overrides, field):
    with pytest.raises(ConfigError, match=rf"model\.moe\.{field}=.*Fix: "):
        check(MoEConfig(**{"num_experts": 8, "topk": 2, **overrides}), Topology(8, ep=4))


def test_check_shared_experts_and_token_split_over_tp():
    with pytest.raises(ConfigError, match=r"model\.moe\.shared_ffn_hidden_size=3: gives shared experts of "
                                          r"width 2 x 3 = 6, not divisible by parallel\.tp=4"):
        check(MoEConfig(num_shared_experts=2, shared_ffn_hidden_size=3), Topology(4, tp=4))
    with pytest.raises(ConfigError, match=r"data\.micro_batch_size=1: a microbatch's 6 tokens per CP rank"):
        check(MoEConfig(), Topology(4, tp=4), sequence_parallel=False, micro_batch_size=1, seq_len=6)
    check(MoEConfig(), Topology(4, tp=4), sequence_parallel=True, micro_batch_size=1, seq_len=6)


def test_check_accepts_a_good_config_and_placement_rule():
    cfg = MoEConfig(num_experts=8, topk=2, score_function="sigmoid", n_group=4, topk_group=2,
                    aux_free_bias_rate=0.001, capacity_factor=1.25, first_k_dense_layers=1, moe_layer_freq=2)
    check(cfg, Topology(8, tp=2, ep=4, etp=2))
    assert [i for i in range(6) if cfg.is_moe_layer(i)] == [1, 3, 5]
