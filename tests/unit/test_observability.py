"""Cross-rank metrics, dashboards (W&B, TensorBoard), stragglers and the profiler."""
from __future__ import annotations

import glob
import json
import math
import os

import pytest
import torch

from tests.unit.test_trainer import _FakeWandb
from trainer.config import compose
from trainer.metrics import STEP_KEY, dashboard_key, histogram, run_provenance
from trainer.rank_metrics import COMM_KEYS, RankSample, find_stragglers, straggler_lines, summarize
from trainer.trainer import Trainer
from trainer.validation import ConfigError, validate

MOE = ["model.channel_mixers=[moe]", "model.moe.num_experts=4", "model.moe.ffn_hidden_size=32",
       "model.moe.aux_loss_coeff=0.01"]


def _rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_rank_sample_round_trips_through_its_vector():
    sample = RankSample(0.5, 0.4, 0.01, 1e9, math.nan, {("all_reduce", "dp_cp"): 123.0, ("send", "pp"): 7.0})
    back = RankSample.unpack(sample.pack())
    assert back.comm == sample.comm and back.step_time_s == 0.5 and math.isnan(back.pipeline_idle)
    assert sample.pack().numel() == 5 + len(COMM_KEYS)


def test_stragglers_are_ranks_slower_than_factor_times_the_median():
    assert find_stragglers([1.0, 1.1, 0.9, 1.6], 1.5) == [3]
    assert find_stragglers([1.0, 1.1, 0.9, 1.4], 1.5) == []
    assert find_stragglers([5.0], 1.5) == []  # one rank is never a straggler


def test_summary_of_the_ranks():
    samples = [RankSample(2.0, 1.0, 0.1, 100.0, 0.2, {("all_reduce", "dp_cp"): 10.0}),
               RankSample(2.0, 2.0, 0.9, 300.0, 0.4, {("all_reduce", "dp_cp"): 10.0, ("send", "pp"): 4.0}),
               RankSample(2.1, 1.2, 0.1, 200.0, 0.3, {})]
    metrics, stragglers = summarize(samples, 1.5)
    assert stragglers == [1]
    assert metrics["perf/step_time_max_s"] == 2.1 and metrics["perf/step_time_min_s"] == 2.0
    assert metrics["perf/busy_time_max_s"] == 2.0 and metrics["perf/busy_time_median_s"] == 1.2
    assert metrics["perf/slowest_rank"] == 1.0 and metrics["perf/stragglers"] == 1.0
    assert metrics["perf/pipeline_idle_fraction"] == pytest.approx(0.3)
    assert metrics["mem/peak_bytes_max"] == 300.0 and metrics["ranks/peak_mem_bytes"] == [100.0, 300.0, 200.0]
    assert metrics["comm/dp_cp/all_reduce_bytes_all_ranks"] == 20.0
    assert metrics["comm/pp/send_bytes_all_ranks"] == 4.0 and metrics["comm/total_bytes_all_ranks"] == 24.0
    line = straggler_lines(samples, stragglers, 1.5)[0]
    assert "rank 1 busy 2.000 s/step, 1.67x the median rank's 1.200 s" in line and "data loading 0.900 s/step" in line


def test_dashboard_groups_and_histograms():
    assert [dashboard_key(k) for k in ("loss", "val_loss", "tokens_per_s", "mfu", "moe/z_loss", "comm/total_bytes")] == [
        "train/loss", "val/loss", "perf/tokens_per_s", "perf/mfu", "moe/z_loss", "comm/total_bytes"]
    assert histogram([3.0, 0.0, 5.0]) == ([3.0, 0.0, 5.0], [0.0, 1.0, 2.0, 3.0])


def test_provenance_names_the_overrides_and_the_commit():
    info = run_provenance(["launch/train.py", "+experiment=quickstart", "optim.lr=1e-3", "--multirun"])
    assert info["overrides"] == ["+experiment=quickstart", "optim.lr=1e-3"]
    assert len(info["git_commit"].split("-")[0]) == 40 or info["git_commit"].startswith("unknown")


def test_metrics_jsonl_carries_the_cross_rank_figures(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + ["trainer.log_interval=2"])).train()
    rows = [r for r in _rows(run) if "loss" in r]
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        for key in ("loss", "tokens_per_s", "perf/step_time_max_s", "perf/data_time_mean_s", "mem/peak_bytes_max",
                    "perf/stragglers", "comm/total_bytes_all_ranks"):
            assert key in row, key
        assert len(row["ranks/step_time_s"]) == 1 and row["mem/peak_bytes_max"] > 10e6  # the RSS of a torch process
        assert row["perf/step_time_max_s"] == pytest.approx(row["step_time_s"])


def test_wandb_receives_grouped_metrics_a_shared_step_axis_and_the_provenance(tmp_path, tiny, monkeypatch):
    fake = _FakeWandb()
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + ["logger=wandb", "trainer.log_interval=2", *MOE])).train()
    assert ((STEP_KEY,), {}) in fake.defined and (("*",), {"step_metric": STEP_KEY}) in fake.defined
    config = fake.inits[0]["config"]
    assert config["run"]["git_commit"] and "overrides" in config["run"] and config["optim"]["lr"] == 3e-3
    train_rows = [r for r in fake.rows if "train/loss" in r]
    assert [r[STEP_KEY] for r in train_rows] == [2, 4]
    row = train_rows[-1]
    for key in ("train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/mfu", "perf/step_time_max_s",
                "mem/peak_bytes_max", "moe/load_balancing", "comm/total_bytes", "val/loss"):
        assert key in row, key
    loads = {k: v for k, v in row.items() if k.startswith("moe/layer")}
    assert sorted(loads) == ["moe/layer0/expert_load", "moe/layer1/expert_load"]
    counts, edges = loads["moe/layer0/expert_load"].np_histogram
    assert len(counts) == 4 and edges == [0.0, 1.0, 2.0, 3.0, 4.0] and sum(counts) > 0
    jsonl = [r for r in _rows(run) if "loss" in r][-1]
    assert len(jsonl["moe/layer0/expert_load"]) == 4


def test_a_real_offline_wandb_run_holds_the_keys_and_the_config(tmp_path, tiny, monkeypatch):
    import wandb

    logged: list[dict] = []
    original = wandb.sdk.wandb_run.Run.log

    def recording_log(self, data, *args, **kwargs):
        logged.append(dict(data))
        return original(self, data, *args, **kwargs)

    monkeypatch.setattr(wandb.sdk.wandb_run.Run, "log", recording_log)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=3) + ["logger=wandb"])).train()
    assert {"train/loss", "perf/tokens_per_s", "mem/peak_bytes_max", STEP_KEY} <= set(logged[-1])
    offline = glob.glob(str(run / "wandb" / "offline-run-*"))
    assert offline and glob.glob(os.path.join(offline[0], "run-*.wandb"))
    config_files = glob.glob(os.path.join(offline[0], "files", "config.yaml"))
    if config_files:  # written when the offline run finishes
        with open(config_files[0]) as f:
            text = f.read()
        assert "git_commit" in text and "optim" in text


def test_tensorboard_receives_grouped_scalars_and_histograms(tmp_path, tiny):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=3) + ["logger=tensorboard", *MOE])).train()
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"histograms": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"train/loss", "val/loss", "perf/tokens_per_s", "mem/peak_bytes_max"} <= set(tags["scalars"])
    assert "moe/layer0/expert_load" in tags["histograms"] and "ranks/step_time_s" in tags["histograms"]


def test_profiler_writes_a_chrome_trace_of_the_chosen_steps(tmp_path, tiny):
    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + ["trainer.profile_steps=[2,3]"])).train()
    traces = glob.glob(str(run / "profile" / "*.json"))
    assert [os.path.basename(t) for t in traces] == ["rank00000_steps2-3.json"]
    with open(traces[0]) as f:
        events = json.load(f)["traceEvents"]
    names = {e.get("name") for e in events}
    assert {"train_step 2", "train_step 3"} <= names and "train_step 1" not in names and "train_step 4" not in names


@pytest.mark.parametrize("overrides, field", [
    (["trainer.profile_steps=[3]"], "trainer.profile_steps"),
    (["trainer.profile_steps=[5,2]"], "trainer.profile_steps"),
    (["trainer.max_steps=10", "trainer.profile_steps=[5,11]"], "trainer.profile_steps"),
    (["trainer.profile_steps=[1,2]", "trainer.profile_ranks=[1]"], "trainer.profile_ranks"),
    (["trainer.straggler_factor=1.0"], "trainer.straggler_factor"),
])
def test_bad_observability_settings_are_refused(overrides, field):
    with pytest.raises(ConfigError) as err:
        validate(compose(overrides))
    assert err.value.field == field


def test_peak_memory_on_cpu_is_the_rss_high_water_mark():
    from trainer.rank_metrics import peak_memory_bytes

    before = peak_memory_bytes(torch.device("cpu"))
    block = torch.ones(64 * 1024 * 1024 // 4)  # 64 MiB
    assert peak_memory_bytes(torch.device("cpu")) >= before and block.sum() > 0


def test_report_of_a_one_process_run(tmp_path, tiny, capsys):
    from launch.report import main as report_main

    run = tmp_path / "run"
    Trainer(compose(tiny(run_dir=run, steps=4) + ["trainer.log_interval=1"])).train()
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss":')  # a running run's half-written last line
    assert report_main([str(run)]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "without data: Expert load over time" not in out
    assert "Expert load" in out and "Communication" in out  # a dense one-process run sends nothing
    page = (run / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "not a MoE model" in page
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
