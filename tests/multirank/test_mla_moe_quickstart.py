"""`+experiment=mla_moe_quickstart` (the tiny DeepSeek-V3-shaped model) in its own default 8-rank
layout, attention tp2 (SP) x cp2 (ring) x pp2 with experts ep4 folded over tp x cp, trains like one
process: the same losses over three steps and, at step 1, the same gradients (assembled from every
rank's slices; relative 1e-5 as in the parity matrix). Data: a small written corpus, short sequences.
"""
from __future__ import annotations

import pytest
import torch

from tests.conftest import write_corpus
from tests.multirank.test_parity import STEPS, assembled, assert_grad_close, on_rank, train_and_capture

pytestmark = pytest.mark.xdist_group("rank_pool")

ONE_PROCESS = ["parallel.tp=1", "parallel.cp=1", "parallel.pp=1", "parallel.ep=1",
               "parallel.sequence_parallel=false"]


def overrides(tmp_path, run_dir) -> list[str]:
    paths = write_corpus(tmp_path / "corpus")
    return ["+experiment=mla_moe_quickstart", "data=text_files", "data.tokenizer=shakespeare_bpe",
            f"data.paths=[{','.join(paths)}]", f"data.cache_dir={tmp_path / 'cache'}", "data.seq_len=32",
            "data.micro_batch_size=2", "data.global_batch_size=4", f"trainer.max_steps={STEPS}",
            "optim.schedule.warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=0",
            "trainer.save_final=false", "trainer.num_threads=1", f"trainer.run_dir={run_dir}"]


def test_mla_moe_quickstart_default_layout_matches_one_process(tmp_path, rank_pools):
    reference = train_and_capture(overrides(tmp_path, tmp_path / "one") + ONE_PROCESS)
    results = rank_pools.get(8).run(on_rank, overrides(tmp_path, tmp_path / "folded"))
    assert sorted(r["tp"] + r["cp"] + r["pp"] for r in results) == sorted(
        (t, 2, c, 2, q, 2) for t in range(2) for c in range(2) for q in range(2))
    for r in results:
        assert r["losses"] == pytest.approx(reference["losses"], rel=1e-5)
    assert reference["losses"][-1] < reference["losses"][0]
    names = set(reference["grads"][0])
    held = set().union(*(r["grads"][0] for r in results))
    if "output.weight" in held - names:  # the tied head's copy on the last pipeline stage
        assert torch.equal(assembled(results, 0, "output.weight"), assembled(results, 0, "embedding.weight"))
        held.discard("output.weight")
    assert held == names
    for name in names:
        assert_grad_close(assembled(results, 0, name), reference["grads"][0][name], f"step 1, grad of {name}",
                          elementwise=True)
    assert results[0]["comm"].get("comm/cp/send_bytes", 0) > 0 and results[0]["comm"].get("comm/ep/all_to_all_bytes", 0) > 0
