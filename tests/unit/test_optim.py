"""Unit tests for optim: param groups, AdamW construction, LR schedules, gradient clipping."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from optim import (
    LRScheduleConfig,
    LRScheduler,
    OptimConfig,
    build_optimizer,
    build_param_groups,
    check,
    clip_grad_norm_,
    lr_at,
    resolved_decay_steps,
)
from parallel_state.errors import ConfigError


class TinyModel(nn.Module):
    """Embedding tied to the head, a biased linear, a norm, and a frozen tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 4)
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.embedding.weight
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def group_names(groups: list[dict]) -> tuple[list[str], list[str]]:
    decay, no_decay = groups
    return decay["names"], no_decay["names"]


# ----------------------------------------------------------------------------------------- groups


def test_param_groups_default_split_norms_biases_no_decay():
    model = TinyModel()
    decay, no_decay = group_names(build_param_groups(model.named_parameters(), OptimConfig()))
    assert decay == ["embedding.weight", "proj.weight"]
    assert no_decay == ["proj.bias", "norm.weight", "norm.bias"]


def test_param_groups_no_decay_names_and_weight_decay_values():
    model = TinyModel()
    cfg = OptimConfig(weight_decay=0.3, no_decay_names=["embedding"])
    groups = build_param_groups(model.named_parameters(), cfg)
    assert group_names(groups) == (
        ["proj.weight"],
        ["embedding.weight", "proj.bias", "norm.weight", "norm.bias"],
    )
    assert groups[0]["weight_decay"] == 0.3
    assert groups[1]["weight_decay"] == 0.0
    for group in groups:  # names stay parallel to params
        assert len(group["names"]) == len(group["params"])


def test_param_groups_tied_param_once_and_frozen_skipped():
    model = TinyModel()
    groups = build_param_groups(model.named_parameters(remove_duplicate=False), OptimConfig())
    all_params = groups[0]["params"] + groups[1]["params"]
    assert len(all_params) == len({id(p) for p in all_params}) == 5
    assert sum(p is model.embedding.weight for p in all_params) == 1
    assert all(p is not model.frozen for p in all_params)
    assert "head.weight" not in groups[0]["names"] + groups[1]["names"]


def test_param_groups_tied_param_exempt_if_any_alias_matches():
    # "head" is the second alias of the tied weight; the decision must not depend on alias order.
    model = TinyModel()
    cfg = OptimConfig(no_decay_names=["head"])
    decay, no_decay = group_names(build_param_groups(model.named_parameters(remove_duplicate=False), cfg))
    assert decay == ["proj.weight"]
    assert no_decay[0] == "embedding.weight"


def test_param_groups_decay_norms_and_biases():
    model = TinyModel()
    cfg = OptimConfig(decay_norms_and_biases=True)
    decay, no_decay = group_names(build_param_groups(model.named_parameters(), cfg))
    assert decay == ["embedding.weight", "proj.weight", "proj.bias", "norm.weight", "norm.bias"]
    assert no_decay == []


# ---------------------------------------------------------------------------------------- optimizer


def test_weight_decay_applied_only_to_decay_group():
    torch.manual_seed(0)
    model = TinyModel()
    cfg = OptimConfig(lr=0.1, weight_decay=0.5, no_decay_names=["embedding"])
    opt = build_optimizer(model.named_parameters(), cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # Adam's update is 0, so only decoupled decay moves params
    opt.step()
    shrink = 1.0 - cfg.lr * cfg.weight_decay
    torch.testing.assert_close(model.proj.weight, before["proj.weight"] * shrink, rtol=0, atol=1e-7)
    for name in ["embedding.weight", "proj.bias", "norm.weight", "norm.bias"]:
        assert torch.equal(dict(model.named_parameters())[name], before[name]), name


def test_build_optimizer_hyperparameters():
    model = TinyModel()
    cfg = OptimConfig(lr=1e-3, beta1=0.8, beta2=0.99, eps=1e-6)
    opt = build_optimizer(model.named_parameters(), cfg)
    assert isinstance(opt, torch.optim.AdamW)
    assert len(opt.param_groups) == 2
    for group in opt.param_groups:
        assert group["betas"] == (0.8, 0.99)
        assert group["eps"] == 1e-6
        assert group["lr"] == 1e-3
        assert group["fused"] is False


def test_fused_flag_reaches_adamw_and_matches_unfused_steps():
    """optim.fused=true builds torch's fused AdamW; its steps match the default path to rounding."""

    def run(fused: bool) -> tuple[torch.optim.Optimizer, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = TinyModel()
        init = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt = build_optimizer(model.named_parameters(), OptimConfig(lr=1e-2, fused=fused))
        gen = torch.Generator().manual_seed(1)
        for _ in range(5):
            tokens = torch.randint(0, 10, (3, 6), generator=gen)
            logits = model.head(model.norm(model.proj(model.embedding(tokens))))
            loss = nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
            opt.zero_grad()
            loss.backward()
            opt.step()
        assert not torch.equal(model.proj.weight, init["proj.weight"])  # the steps did something
        return opt, {n: p.detach().clone() for n, p in model.named_parameters()}

    fused_opt, fused_params = run(True)
    plain_opt, plain_params = run(False)
    assert all(group["fused"] is True for group in fused_opt.param_groups)
    assert all(group["fused"] is False for group in plain_opt.param_groups)
    for name, value in plain_params.items():
        assert value.dtype == torch.float32
        torch.testing.assert_close(fused_params[name], value, rtol=1e-5, atol=1e-6, msg=name)


def test_unknown_optimizer_name_error():
    with pytest.raises(ConfigError, match=r"optim\.name='sgdd'.*adamw"):
        check(OptimConfig(name="sgdd"), max_steps=10)


def test_config_is_omegaconf_structured():
    from omegaconf import OmegaConf

    conf = OmegaConf.structured(OptimConfig)
    conf = OmegaConf.merge(
        conf, {"no_decay_names": ["embedding"], "schedule": {"name": "wsd", "decay_steps": 5}}
    )
    cfg = OmegaConf.to_object(conf)
    assert isinstance(cfg, OptimConfig) and isinstance(cfg.schedule, LRScheduleConfig)
    assert cfg.no_decay_names == ["embedding"] and cfg.schedule.decay_steps == 5


# ---------------------------------------------------------------------------------------- schedules

# lr = 1, floor 0.1, warmup 10, max_steps 110 -> 100 decay steps; step s has done = s + 1.
LR, W, MAX = 1.0, 10, 110


def sched(name: str, **kw) -> LRScheduleConfig:
    return LRScheduleConfig(name=name, warmup_steps=W, min_lr_ratio=0.1, **kw)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "constant"])
def test_warmup_is_linear_and_never_zero(name):
    cfg = sched(name)
    assert lr_at(0, LR, cfg, MAX) == pytest.approx(0.1)
    assert lr_at(4, LR, cfg, MAX) == pytest.approx(0.5)
    assert lr_at(W - 1, LR, cfg, MAX) == pytest.approx(1.0)


def test_cosine_points():
    cfg = sched("cosine")
    assert lr_at(W + 24, LR, cfg, MAX) == pytest.approx(0.1 + 0.45 * (1 + math.sqrt(0.5)))  # p = 0.25
    assert lr_at(W + 49, LR, cfg, MAX) == pytest.approx((1.0 + 0.1) / 2)  # midpoint
    assert lr_at(MAX - 1, LR, cfg, MAX) == pytest.approx(0.1)  # last training step at the floor
    assert lr_at(MAX + 50, LR, cfg, MAX) == pytest.approx(0.1)


def test_linear_points():
    cfg = sched("linear")
    assert lr_at(W + 24, LR, cfg, MAX) == pytest.approx(0.1 + 0.9 * 0.75)
    assert lr_at(W + 49, LR, cfg, MAX) == pytest.approx(0.55)
    assert lr_at(MAX - 1, LR, cfg, MAX) == pytest.approx(0.1)
    assert lr_at(MAX + 50, LR, cfg, MAX) == pytest.approx(0.1)


def test_constant_stays_at_lr():
    cfg = sched("constant")
    assert [lr_at(s, LR, cfg, MAX) for s in (W, MAX - 1, MAX + 50)] == [1.0, 1.0, 1.0]


def test_wsd_stable_then_decays_in_last_fraction():
    cfg = sched("wsd", wsd_decay_fraction=0.2, wsd_decay_shape="linear")
    # Stable through p = 0.8 (done = W + 80), then decays over the last 20 steps.
    assert all(lr_at(s, LR, cfg, MAX) == 1.0 for s in range(W - 1, W + 80))
    assert lr_at(W + 80, LR, cfg, MAX) < 1.0
    assert lr_at(W + 89, LR, cfg, MAX) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(MAX - 1, LR, cfg, MAX) == pytest.approx(0.1)
    assert lr_at(MAX + 50, LR, cfg, MAX) == pytest.approx(0.1)


@pytest.mark.parametrize(
    "shape, quarter",
    [("sqrt", 1 - math.sqrt(0.25)), ("cosine", 0.5 * (1 + math.cos(math.pi / 4))), ("linear", 0.75)],
)
def test_wsd_shapes(shape, quarter):
    cfg = sched("wsd", wsd_decay_fraction=0.2, wsd_decay_shape=shape)
    # done = W + 85 -> p = 0.85 -> a quarter into the decay phase.
    assert lr_at(W + 84, LR, cfg, MAX) == pytest.approx(0.1 + 0.9 * quarter)
    assert lr_at(MAX - 1, LR, cfg, MAX) == pytest.approx(0.1)


def test_explicit_decay_steps_then_floor():
    cfg = LRScheduleConfig(name="linear", warmup_steps=0, decay_steps=10, min_lr_ratio=0.1)
    assert resolved_decay_steps(cfg, 100) == 10
    assert lr_at(0, LR, cfg, 100) == pytest.approx(1.0 - 0.9 * 0.1)  # no warmup: already 1/10 in
    assert lr_at(4, LR, cfg, 100) == pytest.approx(0.55)
    assert lr_at(9, LR, cfg, 100) == pytest.approx(0.1)
    assert lr_at(50, LR, cfg, 100) == pytest.approx(0.1)


def test_lr_scales_with_base_lr():
    cfg = sched("cosine")
    assert lr_at(W + 49, 3e-4, cfg, MAX) == pytest.approx(3e-4 * 0.55)


@pytest.mark.parametrize(
    "cfg",
    [sched("cosine"), sched("linear")]
    + [sched("wsd", wsd_decay_shape=s) for s in ("linear", "cosine", "sqrt")],
    ids=["cosine", "linear", "wsd-linear", "wsd-cosine", "wsd-sqrt"],
)
def test_monotone_non_increasing_after_warmup(cfg):
    lrs = [lr_at(s, LR, cfg, MAX) for s in range(W - 1, MAX + 20)]
    assert all(b <= a for a, b in itertools.pairwise(lrs))
    assert lrs[0] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)


def test_scheduler_sets_groups_with_lr_mult():
    p1, p2 = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([{"params": [p1]}, {"params": [p2], "lr_mult": 0.5}], lr=123.0)
    scheduler = LRScheduler(opt, 2.0, sched("linear"), MAX)
    assert scheduler.apply(W + 49) == pytest.approx(1.1)
    assert opt.param_groups[0]["lr"] == pytest.approx(1.1)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.55)
    assert scheduler.lr(0) == pytest.approx(0.2)


def test_schedule_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"optim\.schedule\.name='exp'"):
        check(OptimConfig(schedule=LRScheduleConfig(name="exp")), MAX)
    with pytest.raises(ConfigError, match=r"optim\.schedule\.wsd_decay_shape='cubic'"):
        check(OptimConfig(schedule=LRScheduleConfig(name="wsd", wsd_decay_shape="cubic")), MAX)
    with pytest.raises(ConfigError, match=r"optim\.schedule\.warmup_steps=200: must be smaller than "
                                          r"trainer\.max_steps=110"):
        check(OptimConfig(schedule=LRScheduleConfig(warmup_steps=200)), MAX)


# ----------------------------------------------------------------------------------------- clipping


def make_grads(seed: int = 0) -> list[nn.Parameter]:
    gen = torch.Generator().manual_seed(seed)
    params = [nn.Parameter(torch.zeros(shape)) for shape in [(7, 5), (5,), (3, 4, 2), (1,)]]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 3.0
    return params


@pytest.mark.parametrize("max_norm", [0.5, 1e4])
def test_clip_matches_torch(max_norm):
    ours, ref = make_grads(), make_grads()
    norm = clip_grad_norm_(ours, max_norm)
    ref_norm = torch.nn.utils.clip_grad_norm_(ref, max_norm)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, ref_norm, rtol=1e-6, atol=1e-6)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)
    if max_norm < ref_norm:  # the clipping case really clipped
        total = torch.sqrt(sum(p.grad.pow(2).sum() for p in ours))
        assert total == pytest.approx(max_norm, rel=1e-5)


def test_clip_norm_reduce_fn_is_applied():
    plain, reduced = make_grads(), make_grads()
    plain_norm = clip_grad_norm_(plain, 0.0)
    calls = []

    def double(sq_sum: torch.Tensor) -> torch.Tensor:
        calls.append(sq_sum.dtype)
        return sq_sum * 2

    reduced_norm = clip_grad_norm_(reduced, 1.0, norm_reduce_fn=double)
    assert calls == [torch.float64]
    torch.testing.assert_close(reduced_norm, plain_norm * math.sqrt(2))
    # The clip coefficient uses the reduced (global) norm.
    coef = 1.0 / (reduced_norm + 1e-6)
    for a, b in zip(plain, reduced):
        torch.testing.assert_close(b.grad, a.grad * coef)


def test_clip_disabled_when_max_norm_zero():
    params, untouched = make_grads(), make_grads()
    norm = clip_grad_norm_(params, 0.0)
    assert norm > 1.0  # would have been clipped
    for a, b in zip(params, untouched):
        assert torch.equal(a.grad, b.grad)


def test_clip_nonfinite_norm_returned_and_grads_untouched():
    params = make_grads()
    params[1].grad[0] = float("nan")
    before = [p.grad.clone() for p in params]
    norm = clip_grad_norm_(params, 1.0)
    assert torch.isnan(norm)
    for p, b in zip(params, before):
        torch.testing.assert_close(p.grad, b, rtol=0, atol=0, equal_nan=True)


def test_clip_bf16_grads_accumulate_in_fp32():
    params = [nn.Parameter(p.detach().to(torch.bfloat16)) for p in make_grads()]
    for p, src in zip(params, make_grads()):
        p.grad = src.grad.to(torch.bfloat16)
    expected = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in params)).float()
    norm = clip_grad_norm_(params, 0.0)
    assert norm.dtype == torch.float32
    torch.testing.assert_close(norm, expected, rtol=1e-6, atol=1e-6)


def test_clip_without_grads_still_calls_reduce():
    # A rank whose params have no grads must still join the collective behind norm_reduce_fn.
    calls = []
    norm = clip_grad_norm_(
        [nn.Parameter(torch.zeros(3))], 1.0, norm_reduce_fn=lambda s: calls.append(1) or s + 4
    )
    assert calls == [1]
    assert norm.item() == pytest.approx(2.0)


def test_squared_norm_is_accurate_and_independent_of_sharding():
    """A skewed gradient (a few embedding rows carry the mass): its norm must not depend on how TP
    shards it, or the clip coefficient (and every clipped gradient) would depend on the layout."""
    from optim.clip import squared_norm

    g = torch.Generator().manual_seed(0)
    grad = torch.randn(4099, 32, generator=g) * torch.rand(4099, 1, generator=g) ** 8
    exact = grad.double().square().sum()
    assert squared_norm(grad).dtype == torch.float64
    torch.testing.assert_close(squared_norm(grad), exact, rtol=1e-7, atol=0)
    for shards in (2, 4, 8):
        sharded = sum(squared_norm(part) for part in grad.tensor_split(shards))
        torch.testing.assert_close(sharded, exact, rtol=1e-7, atol=0)
    assert squared_norm(torch.zeros(0)).item() == 0.0
