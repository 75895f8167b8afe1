"""A self-contained HTML report of a run, drawn from its metrics.jsonl (finished or still running).

Each figure is a PNG embedded as base64, so `report.html` can be mailed or attached as it is:
loss and validation loss; tokens/s and MFU; peak memory per rank; per-rank step and busy time as
heat maps (ranks x logged steps); expert load over time per MoE layer; bytes sent per step by
process group. A figure whose metrics the run does not have (a dense model has no expert load)
says so instead.
"""
from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # no display: render to memory
import matplotlib.pyplot as plt

from trainer.metrics import METRICS_FILE

REPORT_FILE = "report.html"
MAX_MOE_LAYERS = 8  # expert-load panels drawn (the first MoE layers)


@dataclass
class Figure:
    """One section of the report: a title and either a PNG or the reason there is none."""

    title: str
    png: bytes | None
    note: str = ""


def read_metrics(run_dir: str) -> list[dict]:
    """The rows of run_dir/metrics.jsonl (a partly written last line of a running run is skipped)."""
    rows = []
    with open(os.path.join(run_dir, METRICS_FILE)) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _series(rows: list[dict], key: str) -> tuple[list[int], list]:
    pairs = [(r["step"], r[key]) for r in rows if key in r]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _png(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def loss_figure(rows: list[dict]) -> Figure:
    steps, loss = _series(rows, "loss")
    val_steps, val = _series(rows, "val_loss")
    if not steps and not val_steps:
        return Figure("Loss", None, "no loss logged yet")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, loss, label="train loss")
    if val_steps:
        ax.plot(val_steps, val, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.legend()
    return Figure("Loss", _png(fig))


def throughput_figure(rows: list[dict]) -> Figure:
    steps, tps = _series(rows, "tokens_per_s")
    if not steps:
        return Figure("Throughput", None, "no training step logged yet")
    _, mfu = _series(rows, "mfu")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(steps, tps, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens / s", color="tab:blue")
    twin = ax.twinx()
    twin.plot(steps, [100 * m for m in mfu], color="tab:orange")
    twin.set_ylabel("MFU %", color="tab:orange")
    return Figure("Throughput and MFU", _png(fig))


def memory_figure(rows: list[dict]) -> Figure:
    steps, per_rank = _series(rows, "ranks/peak_mem_bytes")
    if not steps:
        return Figure("Peak memory per rank", None, "no per-rank memory logged (run older than the metric)")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for rank in range(len(per_rank[0])):
        ax.plot(steps, [values[rank] / 2**30 for values in per_rank], label=f"rank {rank}")
    ax.set_xlabel("step")
    ax.set_ylabel("GiB (CUDA peak, or CPU RSS high-water mark)")
    if len(per_rank[0]) <= 16:
        ax.legend(fontsize="small", ncol=2)
    return Figure("Peak memory per rank", _png(fig))


def rank_time_figure(rows: list[dict]) -> Figure:
    steps, step_times = _series(rows, "ranks/step_time_s")
    _, busy = _series(rows, "ranks/busy_time_s")
    if not steps:
        return Figure("Step time per rank", None, "no per-rank timing logged (run older than the metric)")
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.5))
    for ax, values, title in ((axes[0], step_times, "step time (s)"), (axes[1], busy, "busy time (s)")):
        grid = [list(column) for column in zip(*values)]  # ranks x logged steps
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(steps[0], steps[-1], len(grid) - 0.5, -0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("rank")
        ax.set_title(title)
        fig.colorbar(image, ax=ax)
    return Figure("Step and busy time per rank (a straggler is a bright row of busy time)", _png(fig))


def expert_load_figure(rows: list[dict]) -> Figure:
    layers = sorted({int(m.group(1)) for r in rows for k in r if (m := re.fullmatch(r"moe/layer(\d+)/expert_load", k))})
    if not layers:
        return Figure("Expert load", None, "no expert load logged (not a MoE model)")
    shown = layers[:MAX_MOE_LAYERS]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.2 * len(shown) + 1, 3.5), squeeze=False)
    for ax, layer in zip(axes[0], shown):
        steps, loads = _series(rows, f"moe/layer{layer}/expert_load")
        shares = [[v / max(sum(load), 1e-12) for v in load] for load in loads]
        grid = [list(column) for column in zip(*shares)]  # experts x logged steps
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma",
                          extent=(steps[0], steps[-1], len(grid) - 0.5, -0.5))
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(image, ax=ax, label="share of tokens")
    return Figure(f"Expert load over time ({len(shown)} of {len(layers)} MoE layers)", _png(fig))


def comm_figure(rows: list[dict]) -> Figure:
    groups: dict[str, dict[int, float]] = {}
    for r in rows:
        for key, value in r.items():
            m = re.fullmatch(r"comm/([^/]+)/\w+_bytes_all_ranks", key)
            if m:
                groups.setdefault(m.group(1), {}).setdefault(r["step"], 0.0)
                groups[m.group(1)][r["step"]] += value
    groups = {g: v for g, v in groups.items() if any(v.values())}
    if not groups:
        return Figure("Communication", None, "no bytes sent (one process)")
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for group, by_step in sorted(groups.items()):
        steps = sorted(by_step)
        ax.plot(steps, [by_step[s] / 2**20 for s in steps], label=group)
    ax.set_xlabel("step")
    ax.set_ylabel("MiB sent per step, all ranks")
    ax.legend(fontsize="small")
    return Figure("Communication by process group", _png(fig))


FIGURES = (loss_figure, throughput_figure, memory_figure, rank_time_figure, expert_load_figure, comm_figure)


def render(run_dir: str) -> tuple[str, list[Figure]]:
    """Write run_dir/report.html; returns its path and the figures it holds."""
    rows = read_metrics(run_dir)
    figures = [make(rows) for make in FIGURES]
    last = next((r for r in reversed(rows) if "loss" in r), {})
    summary = ", ".join(f"{k} {last[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s", "mfu") if k in last)
    parts = [f"<html><head><meta charset='utf-8'><title>foldtron run {html.escape(run_dir)}</title></head><body>",
             f"<h1>foldtron run</h1><p>{html.escape(os.path.abspath(run_dir))}</p>",
             f"<p>last logged step {last.get('step', '-')}: {html.escape(summary)}</p>"]
    for figure in figures:
        parts.append(f"<h2>{html.escape(figure.title)}</h2>")
        if figure.png is None:
            parts.append(f"<p><em>{html.escape(figure.note)}</em></p>")
        else:
            data = base64.b64encode(figure.png).decode()
            parts.append(f"<img alt='{html.escape(figure.title)}' src='data:image/png;base64,{data}'>")
    parts.append("</body></html>")
    path = os.path.join(run_dir, REPORT_FILE)
    with open(path, "w") as f:
        f.write("\n".join(parts))
    return path, figures
