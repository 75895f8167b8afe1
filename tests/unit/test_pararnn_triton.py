"""ParaRNN's Triton scans under TRITON_INTERPRET=1 on tiny shapes, against a float64 Python loop.

triton.jit picks the interpreter when a function is decorated (triton's own library functions
included), so the flag must be set before triton is first imported in a process: every case runs
in one child process (this file run as a script) and the tests check its JSON report. Marked
`triton_interpret` (run with `-m triton_interpret`); the module takes about 25 s on 2 cores.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# One xdist worker runs the whole module, so the interpreter child (the module fixture) runs once.
pytestmark = [pytest.mark.triton_interpret, pytest.mark.xdist_group("pararnn_triton")]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (structure, T, chunk, tile). Chunk 1024 is one pass: lengths below, at and across the 16-step tile
# (the state is carried between tiles). Smaller chunks force the three-phase scan: a one-step last chunk,
# partial-tile last chunks, chunks of several tiles, and (4-step tiles) more chunks than a tile holds, so
# the phase-2 scan over the chunk summaries carries between tiles too. 10 channels is not a multiple of
# the 8-channel block (masked lanes).
SCAN_CASES = [(structure, *case) for structure in ("diagonal", "block2")
              for case in ((1, 1024, 16), (2, 1024, 16), (17, 1024, 16), (40, 1024, 16), (17, 16, 16),
                           (40, 32, 16), (100, 32, 16), (40, 4, 4))]
TOLERANCE = 1e-5


def _case_id(structure: str, seq_len: int, chunk: int, block_t: int) -> str:
    return f"{structure}-T{seq_len}-chunk{chunk}-tile{block_t}"


def _loop(a, b, h0, structure):
    import torch

    h = torch.zeros_like(b[:, 0]) if h0 is None else h0
    out = []
    for t in range(b.shape[1]):
        h = (a[:, t] * h if structure == "diagonal" else torch.einsum("bijd,bjd->bid", a[:, t], h)) + b[:, t]
        out.append(h)
    return torch.stack(out, 1)


def _scan_error(structure: str, seq_len: int, chunk: int, block_t: int = 16, dtype_name: str = "float32") -> float:
    """Largest |triton - loop| over runs with and without an initial state."""
    import torch

    from kernels.triton_pararnn import linear_scan_triton

    gen = torch.Generator().manual_seed(seq_len)
    dtype = getattr(torch, dtype_name)
    block = () if structure == "diagonal" else (2,)
    scale = 0.9 if structure == "diagonal" else 0.45
    a = ((torch.rand(2, seq_len, *block, *block, 10, generator=gen) * 2 - 1) * scale).to(dtype)
    b = torch.randn(2, seq_len, *block, 10, generator=gen).to(dtype)
    h0 = torch.randn(2, *block, 10, generator=gen).to(dtype)
    errors = []
    for initial in (None, h0):
        got = linear_scan_triton(a, b, structure, initial, block_t=block_t, block_d=8, chunk=chunk)
        ref = _loop(a.double(), b.double(), None if initial is None else initial.double(), structure)
        errors.append(float((got.double() - ref).abs().max()))
    return max(errors)


def _solver_error() -> float:
    """Newton solve + adjoint backward of an LSTM cell: Triton scans vs torch scans."""
    import torch

    from kernels.dispatch import KernelsConfig
    from kernels.pararnn import NewtonOptions, parallel_recurrence
    from models.layers.pararnn import LSTMCell

    gen = torch.Generator().manual_seed(0)
    u = torch.randn(1, 20, 3, 6, generator=gen, requires_grad=True)
    params = [(torch.randn(3, 6, generator=gen) * 0.5).requires_grad_(),
              (torch.randn(2, 6, generator=gen) * 0.5).requires_grad_()]
    results = []
    for backend in ("torch", "triton"):
        h, _ = parallel_recurrence(LSTMCell(), u, params, NewtonOptions(iterations=4),
                                   KernelsConfig(backend=backend, on_missing="fail"))
        results.append((h, *torch.autograd.grad(h.sum(), [u, *params])))
    return max(float((x - y).abs().max()) for x, y in zip(*results))


def _chunk_rule() -> dict:
    """Automatic chunk sizes (batch 1, 256 channels = 8 programs per chunk; then a batch that fills
    the GPU alone) and whether a chunk that is not a multiple of block_t is refused."""
    import torch

    from kernels.triton_pararnn import _auto_chunk, linear_scan_triton

    try:
        linear_scan_triton(torch.zeros(1, 4, 3), torch.zeros(1, 4, 3), "diagonal", block_t=16, chunk=24)
        refused = False
    except ValueError:
        refused = True
    return {"T16384": _auto_chunk(16384, 8, 64), "T1024": _auto_chunk(1024, 8, 64),
            "T1024-wide": _auto_chunk(1024, 600, 64), "refuses-unaligned": refused}


def _child_report() -> dict:
    report = {_case_id(*case): _scan_error(*case) for case in SCAN_CASES}
    report.update({f"{s}-fp64": _scan_error(s, 37, c, 16, "float64") for s, c in (("diagonal", 1024), ("block2", 16))})
    report["chunk-rule"] = _chunk_rule()
    report["solver"] = _solver_error()
    return report


# Session-scoped: xdist interleaves other modules' tests, which would tear a module fixture down
# and run it again; its xdist group keeps every user on one worker.
@pytest.fixture(scope="session")
def report() -> dict:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=REPO_ROOT)
    done = subprocess.run([sys.executable, os.path.abspath(__file__)], env=env, capture_output=True,
                          text=True, check=False, timeout=300, cwd=REPO_ROOT)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", SCAN_CASES, ids=[_case_id(*case) for case in SCAN_CASES])
def test_triton_scan_matches_loop(report, case):
    assert report[_case_id(*case)] < TOLERANCE


@pytest.mark.parametrize("structure", ["diagonal", "block2"])
def test_triton_scan_accumulates_fp64_inputs_in_fp64(report, structure):
    # diagonal in one pass, block2 in three chunks (fp64 summaries and chunk-end states).
    assert report[f"{structure}-fp64"] < 1e-12


def test_chunk_rule(report):
    # ~528 programs: 66 chunks of a 16384-step sequence -> 249 steps, rounded up to 4 tiles of 64;
    # short sequences get one-tile chunks; a batch that fills the GPU alone gets a single chunk.
    assert report["chunk-rule"] == {"T16384": 256, "T1024": 64, "T1024-wide": 1024, "refuses-unaligned": True}


def test_newton_solve_with_triton_scans_matches_torch_scans(report):
    assert report["solver"] < TOLERANCE


if __name__ == "__main__":
    print(json.dumps(_child_report()))
