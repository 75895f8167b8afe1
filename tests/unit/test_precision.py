"""trainer.precision: bf16 weights with fp32 main gradients and masters, fp16 loss scaling, autocast."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from optim.grad_buffers import BucketedGradReducer
from optim.loss_scale import DynamicLossScale
from parallel_state.groups import AxisGroup
from trainer.config import compose
from trainer.precision import precision_of
from trainer.trainer import Trainer
from trainer.validation import ConfigError, validate


def test_precision_table():
    assert precision_of("fp32").param_dtype == torch.float32 and precision_of("fp32").autocast_dtype is None
    assert precision_of("bf16").param_dtype == torch.bfloat16 and not precision_of("bf16").loss_scaling
    assert precision_of("fp16").param_dtype == torch.float16 and precision_of("fp16").loss_scaling
    autocast = precision_of("bf16_autocast")
    assert autocast.param_dtype == torch.float32 and autocast.compute_dtype == torch.bfloat16
    assert [precision_of(n).peak_key for n in ("fp32", "bf16", "fp16", "bf16_autocast")] == [
        "fp32", "bf16", "bf16", "bf16"]


def test_dynamic_loss_scale_halves_on_overflow_and_doubles_after_a_clean_window():
    scale = DynamicLossScale(scale=1024.0, window=3, min_scale=256.0)
    history = []
    for overflow in (True, False, False, False, False, True, True, True, False):
        scale.update(overflow)
        history.append(scale.scale)
    assert history == [512, 512, 512, 1024, 1024, 512, 256, 256, 256]
    restored = DynamicLossScale(scale=1.0, window=3)
    restored.load_state_dict(scale.state_dict())
    assert (restored.scale, restored.clean_steps) == (256.0, 1)


def test_main_grads_accumulate_microbatches_in_fp32():
    """bf16 parameters: each microbatch's bf16 gradient is added into an fp32 bucket, so the sum of
    two microbatches is fp32(g1) + fp32(g2), not their bf16 sum."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 64).to(torch.bfloat16)
    xs = [torch.randn(8, 64, dtype=torch.bfloat16) * scale for scale in (1.0, 1e-3)]
    expected = {id(p): torch.zeros(p.shape) for p in layer.parameters()}
    in_bf16 = {id(p): torch.zeros(p.shape, dtype=torch.bfloat16) for p in layer.parameters()}
    for x in xs:
        layer.zero_grad(set_to_none=True)
        layer(x).float().square().sum().backward()
        for p in layer.parameters():
            expected[id(p)] += p.grad.float()
            in_bf16[id(p)] += p.grad
    layer.zero_grad(set_to_none=True)
    reducer = BucketedGradReducer(list(layer.parameters()), AxisGroup.single("dp_cp"), grad_dtype=torch.float32)
    with reducer.no_sync():
        layer(xs[0]).float().square().sum().backward()
    layer(xs[1]).float().square().sum().backward()
    reducer.finish()
    for p in layer.parameters():
        assert p.grad is None  # dropped once added into the fp32 bucket
        main = reducer.main_grad(p)
        assert main.dtype == torch.float32
        torch.testing.assert_close(main, expected[id(p)], rtol=0, atol=0)
    # The small microbatch's gradient survives: a bf16 accumulator would have rounded it away.
    assert not torch.equal(in_bf16[id(layer.weight)].float(), reducer.main_grad(layer.weight))


def _trainer(tiny, tmp_path, name: str, *extra: str, steps: int = 6) -> Trainer:
    return Trainer(compose(tiny(run_dir=tmp_path / name, steps=steps) + ["model.dropout=0.0", *extra]))


def test_bf16_keeps_bf16_weights_fp32_main_grads_and_fp32_masters(tmp_path, tiny):
    t = _trainer(tiny, tmp_path, "bf16", "trainer.precision=bf16")
    assert all(p.dtype == torch.bfloat16 for p in t.model.parameters())
    assert all(p.dtype == torch.float32 for g in t.optimizer.param_groups for p in g["params"])
    assert all(b.buffer.dtype == torch.float32 for r in t.optim_step.reducers.reducers for b in r.buckets)
    for _ in range(2):
        metrics = t.train_step()
        assert math.isfinite(metrics["loss"]) and "loss_scale" not in metrics
    for p in t.model.parameters():
        master = t.optim_step.master_of[id(p)]
        assert master.dtype == torch.float32 and torch.equal(p, master.to(torch.bfloat16))
        assert p.grad is None


def test_bf16_autocast_keeps_fp32_weights(tmp_path, tiny):
    t = _trainer(tiny, tmp_path, "autocast", "trainer.precision=bf16_autocast", steps=3)
    t.train()
    assert all(p.dtype == torch.float32 for p in t.model.parameters())
    assert t.optim_step.master_weights() == []  # the fp32 weights are the masters


def test_bf16_training_tracks_fp32(tmp_path, tiny):
    losses = {}
    for precision in ("fp32", "bf16"):
        t = _trainer(tiny, tmp_path, precision, f"trainer.precision={precision}", steps=20)
        losses[precision] = [t.train_step()["loss"] for _ in range(20)]
    assert losses["bf16"] != losses["fp32"]  # really computed in bf16
    assert losses["bf16"][-1] < losses["bf16"][0] - 1.0
    assert losses["bf16"][-1] == pytest.approx(losses["fp32"][-1], rel=0.02)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_low_precision_resume_is_bit_exact(tmp_path, tiny, precision):
    """The fp32 masters (and fp16's loss scale) are in the checkpoint: resuming continues exactly."""
    extra = [f"trainer.precision={precision}", "trainer.save_interval=3", "optim.loss_scale_window=2"]
    straight = _trainer(tiny, tmp_path, "straight", *extra)
    expected = [straight.train_step()["loss"] for _ in range(6)]
    first = _trainer(tiny, tmp_path, "split", *extra, steps=6)
    losses = [first.train_step()["loss"] for _ in range(3)]
    first.save()
    from trainer.checkpoint_dcp import read_metadata

    stored = read_metadata(str(tmp_path / "split" / "checkpoints" / "step_000003")).state_dict_metadata
    masters = [md for key, md in stored.items() if key.endswith("/master")]
    assert masters and all(md.properties.dtype == torch.float32 for md in masters)
    second = _trainer(tiny, tmp_path, "split", *extra, "trainer.resume=auto", steps=6)
    assert second.step == 3
    if precision == "fp16":
        assert second.loss_scale.scale == first.loss_scale.scale
    losses += [second.train_step()["loss"] for _ in range(3)]
    assert losses == expected


def test_a_precision_switch_on_resume_starts_the_masters_from_the_checkpoint(tmp_path, tiny):
    """fp32 -> bf16: the masters start from the loaded weights (not the fresh initialisation);
    bf16 -> fp32: the fp32 weights become the saved masters, not their bf16 rounding."""
    fp32 = _trainer(tiny, tmp_path, "run", steps=6)
    for _ in range(3):
        fp32.train_step()
    fp32.save()
    saved = {n: p.detach().clone() for n, p in fp32.model.named_parameters()}
    bf16 = _trainer(tiny, tmp_path, "run", "trainer.precision=bf16", "trainer.resume=auto")
    for name, p in bf16.model.named_parameters():
        torch.testing.assert_close(bf16.optim_step.master_of[id(p)], saved[name].to(torch.bfloat16).float(),
                                   rtol=0, atol=0)
    bf16.train_step()
    bf16.save()
    masters = {n: bf16.optim_step.master_of[id(p)].detach().clone() for n, p in bf16.model.named_parameters()}
    back = _trainer(tiny, tmp_path, "run", "trainer.resume=auto")
    assert back.step == 4
    for name, p in back.model.named_parameters():
        assert p.dtype == torch.float32 and torch.equal(p, masters[name]), name


def test_fp16_overflow_skips_the_update_halves_the_scale_and_grows_it_back(tmp_path, tiny):
    t = _trainer(tiny, tmp_path, "fp16", "trainer.precision=fp16", "optim.initial_loss_scale=1e9",
                 "optim.loss_scale_window=2", steps=30)
    history = []
    for _ in range(30):
        before = [p.detach().clone() for p in t.model.parameters()]
        metrics = t.train_step()
        moved = any(not torch.equal(b, p) for b, p in zip(before, t.model.parameters()))
        history.append((metrics["loss_scale"], metrics["overflow"], moved, t.loss_scale.scale))
    assert history[0][1] == 1.0, "a scale of 1e9 must overflow fp16 gradients"
    reference = DynamicLossScale(1e9, window=2)
    for scale, overflow, moved, after in history:
        assert scale == reference.scale
        assert moved != bool(overflow)  # an overflowed step leaves every weight as it was
        reference.update(bool(overflow))
        assert after == reference.scale
    assert any(after == 2 * scale for scale, _, _, after in history)  # grew back after clean steps
    assert t.skipped_in_a_row == 0  # overflows are not non-finite steps for trainer.nan_policy
    log = (tmp_path / "fp16" / "train.log").read_text()
    assert "step 1: fp16 gradients overflowed at loss scale 1e+09; update skipped, loss scale -> 5e+08" in log


def test_fp16_gradients_are_unscaled_before_clipping(tmp_path, tiny):
    norms = {}
    for precision in ("fp32", "fp16"):
        t = _trainer(tiny, tmp_path, precision, f"trainer.precision={precision}", "optim.initial_loss_scale=1024")
        norms[precision] = t.train_step()["grad_norm"]
    assert norms["fp16"] == pytest.approx(norms["fp32"], rel=0.02)


def test_fp16_window_metrics_count_the_skipped_steps(tmp_path, tiny):
    t = _trainer(tiny, tmp_path, "fp16m", "trainer.precision=fp16", "optim.initial_loss_scale=1e9",
                 "trainer.log_interval=5", "trainer.eval_interval=0", steps=5)
    last = t.train()
    assert last["overflow_steps"] >= 1 and last["loss_scale"] < 1e9


@pytest.mark.parametrize("overrides, field, words", [
    (["trainer.precision=fp16", "optim.loss_scale_window=null"], "optim.loss_scale_window", "trainer.precision=bf16"),
    (["trainer.precision=fp16", "optim.loss_scale_window=0"], "optim.loss_scale_window", "1000"),
    (["trainer.precision=fp16", "optim.initial_loss_scale=0.5"], "optim.initial_loss_scale", "min_loss_scale"),
    (["trainer.precision=fp8"], "trainer.precision", "bf16_autocast"),
])
def test_bad_precision_settings_are_refused_up_front(overrides, field, words):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert err.value.field == field and words in str(err.value)


def test_bf16_without_loss_scale_window_is_fine():
    validate(compose(["trainer.precision=bf16", "optim.loss_scale_window=null"]))
