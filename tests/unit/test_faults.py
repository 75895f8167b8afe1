"""trainer/faults.py without processes: stop signal and time limit, NaN localisation on a one-process
model, hang messages and stack dumps, the restart policy, and trainer.time_limit validation."""
from __future__ import annotations

import os
import signal

import pytest
import torch
import torch.distributed as dist

from models import build_model
from parallel_state.comm_stats import CommStats
from parallel_state.errors import ConfigError
from trainer import faults
from trainer.config import TrainerConfig, check_trainer, compose


def test_time_limit_must_be_positive():
    check_trainer(TrainerConfig(time_limit=1.5))
    for bad in (0, -3.0):
        with pytest.raises(ConfigError, match=r"trainer.time_limit=.*must be > 0 minutes.*Fix"):
            check_trainer(TrainerConfig(time_limit=bad))


def test_stop_signal_time_limit_counts_from_the_job_start():
    stop = faults.StopSignal.from_environ(2.0, {faults.START_TIME_ENV: "1000"})
    assert stop.start_time == 1000.0
    assert stop.local_code(now=1000 + 119) == faults.STOP_NONE
    assert stop.local_code(now=1000 + 120) == faults.STOP_TIME_LIMIT
    assert "trainer.time_limit=2.0 minutes" in stop.describe(faults.STOP_TIME_LIMIT)
    assert faults.StopSignal(time_limit_min=None).local_code(now=1e12) == faults.STOP_NONE


def test_sigterm_sets_the_flag_and_uninstall_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    stop = faults.StopSignal(time_limit_min=1e9)
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.local_code() == faults.STOP_SIGNAL  # the signal wins over the (unreached) limit
        assert stop.describe(faults.STOP_SIGNAL) == "SIGTERM received"
    finally:
        stop.uninstall()
    assert signal.getsignal(signal.SIGTERM) is before
    assert faults.STOP_SIGNAL > faults.STOP_TIME_LIMIT > faults.STOP_NONE  # agreed with MAX


def test_run_stopped_message_and_status():
    e = faults.RunStopped("SIGTERM received", 7, "runs/x/checkpoints/step_000007")
    assert e.exit_code == faults.EXIT_STOPPED == 75
    assert "after step 7" in str(e) and "trainer.resume=auto" in str(e)


@pytest.mark.parametrize("name,layer", [
    ("layers.3.mlp.up", 3), ("chunks.1.layers.12.attn", 12), ("embedding", -1), ("final_norm", 4), ("head", 4)])
def test_layer_of(name, layer):
    assert faults.layer_of(name, num_layers=4) == layer


def test_display_name_drops_the_chunk_prefix():
    assert faults.display_name("chunks.1.layers.5.mlp") == "layers.5.mlp"


def test_summary_names_the_first_layer_and_its_ranks():
    per_rank = [
        {"forward": (1, 9, "layers.1.mlp.down"), "backward": None, "grads": [(1, "layers.1.mlp.up.weight")]},
        {"forward": (1, 7, "layers.1.mlp.up"), "backward": None, "grads": [(1, "layers.1.mlp.up.weight")]},
        {"forward": None, "backward": None, "grads": []},
        {"forward": (1, 7, "layers.1.mlp.up"), "backward": None, "grads": []},
    ]
    msg = faults.summarize_non_finite(per_rank)
    assert "first went non-finite in layers.1.mlp.up (layer 1) on ranks 1, 3 (then on ranks 0)" in msg
    assert "parameter gradients" not in msg  # after a non-finite forward every gradient is
    only_grads = [{"forward": None, "backward": None, "grads": g} for g in ([(0, "a"), (2, "layers.2.w")], [], [(2, "b")])]
    assert ("parameter gradients are non-finite on ranks 0, 2, from layer 2 down (b, layers.2.w on ranks 0, 2)"
            in faults.summarize_non_finite(only_grads))


def test_summary_of_a_backward_only_fault_and_of_nothing():
    per_rank = [{"forward": None, "backward": (-2, 3, "layers.2.attn"), "grads": [(2, "x")]},
                {"forward": None, "backward": (-1, 5, "layers.1.attn"), "grads": [(1, "y")]}]
    msg = faults.summarize_non_finite(per_rank)
    assert "gradient first went non-finite in backward at layers.2.attn (layer 2) on rank 0" in msg
    assert "no non-finite" in faults.summarize_non_finite([{"forward": None, "backward": None, "grads": []}])


@pytest.fixture(scope="module")
def tiny_model():
    """One 3-layer model for the diagnosis tests (building it dominates their time on a loaded machine)."""
    cfg = compose(["model.hidden_size=32", "model.num_layers=3", "model.num_heads=4", "model.num_kv_heads=2",
                   "model.vocab_size=64", "model.max_position_embeddings=16"])
    return build_model(cfg.model, seed=0, device=torch.device("cpu")), cfg.model.num_layers


def _inject(module: torch.nn.Module, where: str):
    """Replace the output of `module` by Inf (forward) or its gradient by Inf (backward)."""
    if where == "forward":
        return module.register_forward_hook(lambda m, i, out: out * float("inf"))

    def hook(m, i, out):
        out.register_hook(lambda g: torch.full_like(g, float("nan")))
    return module.register_forward_hook(hook)


@pytest.mark.parametrize("where", ["forward", "backward"])
def test_diagnosis_finds_the_layer_of_an_injected_fault(where, tiny_model):
    torch.manual_seed(0)
    model, num_layers = tiny_model
    model.zero_grad()
    ids = torch.randint(0, 64, (2, 8))
    streams = _Streams()
    target = dict(model.named_modules())["layers.1.mlp"]
    handle = _inject(target, where)

    def rerun():
        model.token_losses(ids, ids).sum().backward()

    rerun()  # the failed step itself: its gradients are non-finite
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    rng_before = torch.get_rng_state()
    msg = faults.diagnose_non_finite(model, num_layers, rerun, streams, gather=lambda f: [f])
    handle.remove()
    if where == "forward":
        assert "forward output first went non-finite in layers.1.mlp" in msg and "(layer 1) on rank 0" in msg
    else:
        assert "gradient first went non-finite in backward at layers.1.mlp" in msg
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())  # weights untouched
    assert torch.equal(torch.get_rng_state(), rng_before)  # the re-run moved no random stream
    assert not any(h for m in model.modules() for h in m._forward_hooks.values())  # probes removed


class _Streams:
    """RNGStreams' state interface, for a model without dropout."""

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def test_a_healthy_model_reports_nothing(tiny_model):
    model, num_layers = tiny_model
    model.zero_grad()
    ids = torch.randint(0, 64, (2, 8))
    msg = faults.diagnose_non_finite(model, num_layers, lambda: model.token_losses(ids, ids).sum().backward(),
                                     _Streams(), gather=lambda f: [f])
    assert "found no non-finite" in msg


def test_comm_stats_remember_the_last_collective_even_when_paused():
    stats = CommStats()
    stats.record("all_reduce", "dp_cp", 8)
    with stats.paused():
        stats.record("all_gather", "tp", 8)
    assert stats.last == ("all_gather", "tp") and stats.total() == 8


def test_collective_timeout_message_names_the_op_and_ranks():
    cause = RuntimeError("[gloo/unbound_buffer.cc:78] Timed out waiting 3000ms for recv operation to complete")
    assert faults.is_collective_failure(cause)
    assert not faults.is_collective_failure(RuntimeError("shape mismatch"))
    msg = faults.describe_collective(("all_reduce", "dp_cp"), lambda g: (1, 3), rank=3, timeout_s=3.0, cause=cause)
    assert msg.startswith("rank 3: all_reduce on the dp_cp group (global ranks 1, 3) did not complete within "
                          "parallel.timeout_s=3 s")
    assert "Timed out waiting 3000ms" in msg


def test_hang_watch_dumps_every_thread_when_asked(tmp_path):
    store = dist.HashStore()
    watch = faults.HangWatch(store, "dump", rank=2, stack_dir=str(tmp_path), poll_s=0.05).start()
    watch.request("rank 0: all_reduce on tp timed out", wait_s=5.0)
    watch.stop()
    text = (tmp_path / "rank00002.txt").read_text()
    assert text.startswith("[rank2] foldtron: stacks of every thread, asked for after: rank 0: all_reduce on tp")
    assert "foldtron-hang-watch" in text or "Thread" in text  # faulthandler's per-thread header
    assert "test_hang_watch_dumps_every_thread_when_asked" in text  # the main thread's frame


def test_restart_policy():
    fine = {"TORCHELASTIC_MAX_RESTARTS": "0"}
    faults.check_restart_policy("none", None, fine)
    restarts = {"TORCHELASTIC_MAX_RESTARTS": "3", "TORCHELASTIC_RESTART_COUNT": "1"}
    faults.check_restart_policy("auto", "runs/x", restarts)
    with pytest.raises(ConfigError, match=r"trainer.run_dir=None: under torchrun --max-restarts=3.*new timestamped"):
        faults.check_restart_policy("auto", None, restarts)


def test_restart_that_would_start_over_in_a_run_dir_with_checkpoints(tmp_path):
    os.makedirs(tmp_path / "checkpoints" / "step_000020")
    restarts = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_RESTART_COUNT": "1"}
    with pytest.raises(ConfigError) as e:
        faults.check_restart_policy("none", str(tmp_path), restarts)
    assert "attempt 2" in str(e.value) and "newest: step 20" in str(e.value)
    assert "Fix: use trainer.resume=auto" in str(e.value)


def test_restart_store_warning_only_for_restarts_on_the_shared_agent_store():
    shared = {"TORCHELASTIC_MAX_RESTARTS": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    assert "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in faults.restart_store_warning(shared)
    assert faults.restart_store_warning({**shared, "TORCHELASTIC_USE_AGENT_STORE": "False"}) is None
    assert faults.restart_store_warning({**shared, "TORCHELASTIC_MAX_RESTARTS": "0"}) is None


def test_a_dead_peer_is_named_as_such():
    cause = RuntimeError("[gloo/pair.cc:537] Read error [127.0.0.1]:42918: Connection reset by peer. This is "
                         "typically caused by a remote worker hanging")
    msg = faults.describe_collective(("all_gather", "world"), lambda g: (0, 1), rank=0, timeout_s=600, cause=cause)
    assert "all_gather on the world group (global ranks 0, 1) failed: a rank of that group closed its connection" in msg
    assert "typically caused" not in msg
