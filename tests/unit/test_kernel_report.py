"""The start-up kernel line names what really runs (checked against the calls a forward makes)."""
from __future__ import annotations

import warnings

import pytest
import torch

import kernels.pararnn as pararnn_kernels
import trainer.kernel_report as report
from kernels import pararnn_cpu
from kernels.dispatch import KernelBackendWarning
from kernels.fast_paths import FastPaths
from models.layers.pararnn import ParaGRUMixer
from models.mixers import MIXERS
from trainer.config import compose

CPU = torch.device("cpu")


def model_cfg(*overrides: str):
    return compose(["+experiment=pararnn_quickstart", "model.hidden_size=32", *overrides]).model


def fused_calls_in_a_forward(cfg, monkeypatch) -> int:
    """How often a ParaGRU forward+backward built from `cfg` calls the fused C solver and adjoint."""
    calls = []
    for name in ("fused_newton_solve", "fused_adjoint"):
        real = getattr(pararnn_kernels, name)
        monkeypatch.setattr(pararnn_kernels, name, lambda *a, _real=real, **k: calls.append(1) or _real(*a, **k))
    layer = ParaGRUMixer(cfg)
    layer(torch.randn(1, 16, cfg.hidden_size)).sum().backward()
    return len(calls)


def test_pararnn_on_cpu_reports_the_fused_solver_that_runs(monkeypatch):
    cfg = model_cfg()
    assert report.kernel_plan(cfg, CPU, "fp32")["pararnn"].startswith("fused C Newton solver")
    assert fused_calls_in_a_forward(cfg, monkeypatch) == 2


def test_pararnn_reports_the_torch_passes_when_they_run(monkeypatch):
    monkeypatch.setenv("FOLDTRON_KERNELS_BACKEND", "torch")
    cfg = model_cfg()
    assert report.kernel_plan(cfg, CPU, "fp32")["pararnn"] == "torch passes + torch scan"
    assert fused_calls_in_a_forward(cfg, monkeypatch) == 0


def test_adaptive_newton_reports_torch_forward_and_fused_adjoint(monkeypatch):
    cfg = model_cfg("model.pararnn.newton_tol=1e-5")
    assert report.kernel_plan(cfg, CPU, "fp32")["pararnn"] == (
        "torch passes + torch scan forward, fused C adjoint backward (kernels/pararnn_cpu.c)")
    assert fused_calls_in_a_forward(cfg, monkeypatch) == 1


def test_pararnn_says_why_the_fused_solver_is_missing(monkeypatch):
    monkeypatch.setattr(pararnn_cpu, "fused_solver_available", lambda dtype: (False, "cc: not found"))
    text = report.kernel_plan(model_cfg(), CPU, "fp32")["pararnn"]
    assert text == "torch passes + torch scan (fused C solver unavailable: cc: not found)"


@pytest.mark.parametrize("fused_missing", [False, True])
@pytest.mark.parametrize("overrides", [(), ("model.pararnn.newton_tol=1e-5",),
                                       ("model.token_mixers=[pararnn_lstm]",)])
def test_pararnn_line_describes_the_plan_the_layer_builds(monkeypatch, overrides, fused_missing):
    """One source of truth: the line is the description of the plan a layer's first forward builds."""
    if fused_missing:
        monkeypatch.setattr(pararnn_cpu, "fused_solver_available", lambda dtype: (False, "cc: not found"))
    cfg = model_cfg(*overrides)
    layer = MIXERS[cfg.token_mixers[0]].cls(cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        layer(torch.randn(1, 4, cfg.hidden_size))
    assert any(issubclass(w.category, KernelBackendWarning) for w in caught) == fused_missing
    (plan,) = layer.solver_plans.values()
    assert report.kernel_plan(cfg, CPU, "fp32")["pararnn"] == plan.describe()
    assert (plan.backward == "fused_c") != fused_missing


def test_plan_lists_only_the_ops_the_model_has():
    quick = compose(["+experiment=quickstart"]).model
    assert report.kernel_plan(quick, CPU, "fp32") == {"attention": "torch SDPA"}
    hybrid = compose(["+experiment=gla_hybrid_quickstart"]).model
    assert report.kernel_plan(hybrid, CPU, "bf16") == {"attention": "torch SDPA", "gla": "torch chunkwise"}
    moe = compose(["+experiment=moe_quickstart"]).model
    assert report.kernel_plan(moe, CPU, "fp32")["moe_experts"] == "one matmul per expert"  # auto: loop on CPU
    forced = compose(["+experiment=moe_quickstart", "model.moe.grouped_gemm=grouped_mm"]).model
    assert report.kernel_plan(forced, CPU, "fp32")["moe_experts"] == "torch._grouped_mm"


def test_optional_packages_are_reported_as_installed_not_used():
    line = report.describe_kernels({"attention": "torch SDPA"},
                                   FastPaths(cuda=False, triton=True, apex=True, transformer_engine=False))
    assert line == ("kernels: attention=torch SDPA; cuda=no, triton=installed, not used (no CUDA), "
                    "apex=installed, not used, transformer_engine=not installed")
