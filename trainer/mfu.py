"""Peak FLOP/s per device, for model FLOPs utilisation (MFU).

MFU = (model training FLOPs per token x tokens/s) / (peak FLOP/s x devices). The peak is
trainer.peak_tflops when set; on known GPUs a table of dense tensor-core peaks; on a CPU (or an
unknown GPU) a short matmul probe, so CPU MFU reads as "fraction of what this machine's matmul does".
"""
from __future__ import annotations

import time

import torch

# Dense (no sparsity) peak TFLOP/s by precision, from the vendors' data sheets (SXM parts).
GPU_PEAK_TFLOPS = (
    ("H200", {"bf16": 989.0, "fp32": 67.0}),
    ("H100", {"bf16": 989.0, "fp32": 67.0}),
    ("B200", {"bf16": 2250.0, "fp32": 80.0}),
    ("A100", {"bf16": 312.0, "fp32": 19.5}),
    ("L40S", {"bf16": 362.0, "fp32": 91.6}),
)


def table_peak_tflops(device_name: str, precision: str) -> float | None:
    for key, peaks in GPU_PEAK_TFLOPS:
        if key in device_name.upper():
            return peaks[precision]
    return None


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype, size: int = 1024,
                          seconds: float = 0.3) -> float:
    """Achieved TFLOP/s of a square matmul: a stand-in peak for devices without a table entry."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    _sync(device)
    return 2 * size**3 * n / (time.perf_counter() - start) / 1e12


def peak_tflops(device: torch.device, precision: str, configured: float | None) -> tuple[float, str]:
    """(peak TFLOP/s per device, where the number came from)."""
    if configured is not None:
        return configured, "trainer.peak_tflops"
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = table_peak_tflops(name, precision)
        if peak is not None:
            return peak, f"{name} data sheet ({precision} dense)"
        return measure_matmul_tflops(device, dtype, size=4096), f"{name} matmul probe"
    return measure_matmul_tflops(device, dtype), f"CPU {dtype} matmul probe"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
