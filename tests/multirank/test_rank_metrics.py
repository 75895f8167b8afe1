"""Cross-rank metrics on real ranks: a slow rank is named as the straggler, the pipeline's idle
fraction is reported, and every rank's figures reach rank 0's metrics."""
from __future__ import annotations

import json
import time

import pytest
import torch.distributed as dist

from tests.conftest import tiny_overrides
from trainer.config import compose
from trainer.distributed import RuntimeEnv
from trainer.trainer import Trainer

pytestmark = pytest.mark.xdist_group("rank_pool")

DELAY_S = 0.4


def train_with_slow_rank(overrides: list[str], slow_rank: int | None) -> str:
    world = dist.get_world_size()
    env = RuntimeEnv(rank=dist.get_rank(), world_size=world, local_rank=dist.get_rank(), local_world_size=world)
    trainer = Trainer(compose(overrides), env=env)
    if dist.get_rank() == slow_rank:  # a slow data loader on one rank
        load = trainer.data.train_microbatches

        def slow_load(step):
            time.sleep(DELAY_S)
            return load(step)

        trainer.data.train_microbatches = slow_load
    trainer.train()
    return str(trainer.run_dir)


def _rows(run_dir: str) -> list[dict]:
    with open(f"{run_dir}/metrics.jsonl") as f:
        return [json.loads(line) for line in f if '"loss"' in line]


def test_a_slow_data_loader_makes_its_rank_the_named_straggler(tmp_path, rank_pools):
    overrides = tiny_overrides(tmp_path, steps=4) + ["trainer.log_interval=2", "trainer.save_final=false",
                                                     "trainer.eval_at_end=false", "trainer.eval_interval=0"]
    run_dir = rank_pools.get(2).run(train_with_slow_rank, overrides, 1)[0]
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [2, 4]
    for row in rows:
        assert row["perf/stragglers"] == 1.0 and row["perf/slowest_rank"] == 1.0
        assert row["ranks/data_time_s"][1] >= DELAY_S > row["ranks/data_time_s"][0]
        # Rank 0 waits for rank 1 in the step's first all-reduce: its busy time excludes the wait.
        assert row["ranks/busy_time_s"][1] > row["ranks/busy_time_s"][0] + DELAY_S / 2
    with open(f"{run_dir}/train.log") as f:
        log = f.read()
    assert "straggler: rank 1 busy" in log and "straggler: rank 0" not in log


def test_a_balanced_run_names_no_straggler_and_reports_pipeline_idle(tmp_path, rank_pools):
    overrides = tiny_overrides(tmp_path, steps=4) + ["trainer.log_interval=2", "trainer.save_final=false",
                                                     "parallel.pp=2", "data.micro_batch_size=1",
                                                     "trainer.straggler_factor=3.0"]
    run_dir = rank_pools.get(2).run(train_with_slow_rank, overrides, None)[0]
    for row in _rows(run_dir):
        assert row["perf/stragglers"] == 0.0
        assert 0.0 < row["perf/pipeline_idle_fraction"] < 1.0 and len(row["ranks/pipeline_idle"]) == 2
        assert row["comm/pp/send_bytes_all_ranks"] > row["comm/pp/send_bytes"]  # both stages send
        assert len(row["ranks/peak_mem_bytes"]) == 2 and min(row["ranks/peak_mem_bytes"]) > 0


def test_run_report_draws_every_figure_from_a_moe_run(tmp_path, rank_pools):
    from launch.report import main as report_main
    from tests.multirank.test_parity import MOE
    from trainer.report import read_metrics, render

    overrides = tiny_overrides(tmp_path, steps=4) + ["trainer.log_interval=1", "trainer.save_final=false",
                                                     "trainer.eval_interval=2", *MOE, "parallel.ep=2",
                                                     "data.micro_batch_size=1"]
    run_dir = rank_pools.get(2).run(train_with_slow_rank, overrides, None)[0]
    assert report_main([run_dir]) == 0
    path, figures = render(run_dir)
    assert [f.title for f in figures if f.png is None] == []  # every figure has data
    with open(path) as f:
        page = f.read()
    assert page.count("data:image/png;base64,") == len(figures) and "<script" not in page
    assert len(read_metrics(run_dir)) >= 4
