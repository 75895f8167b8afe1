"""GLA Triton kernels (forward and backward) under TRITON_INTERPRET=1 on tiny fp32 shapes.

triton.jit chooses the interpreter when a function is decorated, including triton's own library
functions, so the flag must be set before triton is first imported in a process. The cases
therefore run in one child process (this file run as a script) and the tests check its report.
Slow on CPU (the interpreter runs every program in numpy): about 20-40 s for the module on
2 cores, so the tests are marked `triton_interpret` (run with `-m triton_interpret`).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One xdist worker runs the whole module, so the interpreter child (the module fixture) runs once.
pytestmark = [pytest.mark.triton_interpret, pytest.mark.xdist_group("gla_triton")]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# (T, K, V, initial state, final state): T below, at and across the chunk of 64; K and V not powers of
# two (masked lanes) and V split over two value blocks.
CASES = [(1, 16, 16, True, True), (64, 16, 16, True, False), (65, 16, 32, False, True),
         (130, 20, 80, True, True)]
TOLERANCE = 2e-5


def _case_id(case) -> str:
    return "T{}-K{}-V{}-h0{}-final{}".format(*case)


def _relative_errors(case) -> dict[str, float]:
    """Max abs error / (max |reference| + 1) of every output and gradient against float64 steps."""
    import torch
    import torch.nn.functional as F

    from kernels.gla import naive_recurrent_gla
    from kernels.triton_gla import chunk_gla_triton

    seq_len, key_dim, value_dim, use_h0, use_final = case
    gen = torch.Generator().manual_seed(seq_len)
    shape_k, shape_v = (1, seq_len, 2, key_dim), (1, seq_len, 2, value_dim)
    inputs = [torch.randn(shape_k, generator=gen), torch.randn(shape_k, generator=gen),
              torch.randn(shape_v, generator=gen), F.logsigmoid(3 * torch.randn(shape_k, generator=gen))]
    h0 = torch.randn(1, 2, key_dim, value_dim, generator=gen) if use_h0 else None
    do = torch.randn(shape_v, generator=gen, dtype=torch.float64)
    dht = torch.randn(1, 2, key_dim, value_dim, generator=gen, dtype=torch.float64)

    def run(op, dtype):
        leaves = [x.to(dtype).requires_grad_() for x in inputs]
        initial = None if h0 is None else h0.to(dtype).requires_grad_()
        o, final = op(*leaves, initial_state=initial, output_final_state=use_final)
        loss = (o.double() * do).sum() + ((final.double() * dht).sum() if use_final else 0.0)
        grads = torch.autograd.grad(loss, leaves + ([] if initial is None else [initial]))
        return [o] + ([final] if use_final else []) + list(grads)

    names = ["o"] + (["final_state"] if use_final else []) + ["dq", "dk", "dv", "dg"] + (["dh0"] if use_h0 else [])
    expected = run(naive_recurrent_gla, torch.float64)
    actual = run(chunk_gla_triton, torch.float32)
    return {name: ((a.double() - e).abs().max() / (e.abs().max() + 1.0)).item()
            for name, a, e in zip(names, actual, expected)}


def _extreme_gate_errors() -> dict[str, float]:
    """Decays of up to 60 nats per step: outputs must stay finite and exact."""
    import torch

    from kernels.gla import naive_recurrent_gla
    from kernels.triton_gla import chunk_gla_triton

    gen = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 80, 1, 16, generator=gen) for _ in range(3))
    g = -60.0 * torch.rand(1, 80, 1, 16, generator=gen)
    o, final = chunk_gla_triton(q, k, v, g, output_final_state=True)
    o_ref, final_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), output_final_state=True)
    return {name: ((a.double() - e).abs().max() / (e.abs().max() + 1.0)).item()
            for name, a, e in (("o", o, o_ref), ("final_state", final, final_ref))}


# Session-scoped: xdist interleaves other modules' tests, which would tear a module fixture down
# and run it again; its xdist group keeps every user on one worker.
@pytest.fixture(scope="session")
def interpreter_report() -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO_ROOT)
    result = subprocess.run([sys.executable, os.path.abspath(__file__)], cwd=REPO_ROOT, env=env,
                            capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_triton_chunk_matches_float64_recurrence(interpreter_report, case):
    errors = interpreter_report[_case_id(case)]
    bad = {name: err for name, err in errors.items() if not err <= TOLERANCE}
    assert not bad, f"relative errors above {TOLERANCE}: {bad}"


def test_triton_extreme_gates_stay_finite_and_exact(interpreter_report):
    errors = interpreter_report["extreme_gates"]
    assert all(err <= 1e-5 for err in errors.values()), errors  # NaN/inf fail this comparison too


def test_dispatcher_picks_triton_under_the_interpreter(interpreter_report):
    assert interpreter_report["dispatch"] == "triton"


if __name__ == "__main__":
    import torch

    from kernels.dispatch import KernelsConfig, select_backend

    report = {_case_id(case): _relative_errors(case) for case in CASES}
    report["extreme_gates"] = _extreme_gate_errors()
    report["dispatch"] = select_backend(torch.device("cpu"), KernelsConfig("triton", on_missing="fail"))
    print(json.dumps(report))
