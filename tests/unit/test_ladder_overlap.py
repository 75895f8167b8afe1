"""The ladder's collectives are in flight while other work runs (docs/ladder.md, "What overlaps").

One process plays rank 0 of a tp = 2 job on the `fake` backend (collectives return at once, values
are meaningless), and every all-reduce is recorded: when it is launched, when it is waited on, and
which module's weight gradient autograd computes in between. Order is what is checked, not time.
"""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.distributed as dist

from models import ModelConfig, build_model
from models.layers.tensor_parallel import TPContext
from models.parallel_context import ParallelContext
from parallel_state.groups import AxisGroup
from tests.multirank.harness import fake_world


class RecordedWork:
    def __init__(self, work, index: int, events: list):
        self.work, self.index, self.events = work, index, events

    def wait(self, *args) -> bool:
        self.events.append(("wait", self.index))
        if self.work is not None:
            self.work.wait(*args)
        return True

    def is_completed(self) -> bool:
        return True


@pytest.fixture
def recorded_all_reduces(monkeypatch):
    events: list = []
    counter = itertools.count()
    real = dist.all_reduce

    def all_reduce(tensor, *args, async_op: bool = False, **kwargs):
        work = real(tensor, *args, async_op=async_op, **kwargs)
        if not async_op:
            events.append(("sync", None))
            return work
        index = next(counter)
        events.append(("launch", index))
        return RecordedWork(work, index, events)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return events


def run_step(residual: str, events: list) -> list:
    """Forward + backward of a 2-layer model as TP rank 0 of 2; returns the events of the backward."""
    cfg = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=4,
                      ffn_hidden_size=64, residual=residual)
    with fake_world(0, 2):
        tp = AxisGroup("tp", dist.group.WORLD, (0, 1), 0)
        model = build_model(cfg, seed=0, par=ParallelContext(tp=TPContext(tp)))
        for key, block in model.layers.items():
            for name, projection in ((f"{key}.wo", block.attention.wo), (f"{key}.w2", block.mlp.w2)):
                projection.weight.register_hook(lambda grad, n=name: events.append(("grad", n)))
        out = model(torch.randint(0, 64, (1, 8)))
        events.append(("backward", None))
        out.float().sum().backward()
    return events[events.index(("backward", None)) + 1:]


def test_forward_reductions_are_waited_on_after_the_next_module_was_issued(recorded_all_reduces):
    run_step("ladder", recorded_all_reduces)
    forward = recorded_all_reduces[:recorded_all_reduces.index(("backward", None))]
    launches = [i for kind, i in forward if kind == "launch"]
    assert len(launches) == 4  # one per sub-module's output projection
    for first, second in itertools.pairwise(launches):
        # module j's reduction is still pending when module j+1's is launched
        assert forward.index(("wait", first)) > forward.index(("launch", second))


def test_backward_input_gradient_reductions_overlap_the_previous_modules_backward(recorded_all_reduces):
    backward = run_step("ladder", recorded_all_reduces)
    launched = [i for kind, i in backward if kind == "launch"]
    assert len(launched) == 4  # one input-gradient reduction per sub-module
    overlapped = 0
    for index in launched:
        start, end = backward.index(("launch", index)), backward.index(("wait", index))
        overlapped += any(kind == "grad" for kind, _ in backward[start + 1:end])
    assert overlapped == 3  # all but the first module's, which has no earlier module to overlap


def test_standard_model_reduces_synchronously(recorded_all_reduces):
    backward = run_step("standard", recorded_all_reduces)
    assert not [i for kind, i in backward if kind == "launch"]
