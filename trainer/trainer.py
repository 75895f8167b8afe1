"""The training loop: setup in a fixed order, then steps, evaluation, logging and checkpoints.

Setup order is part of the contract: the config is validated before any tokenizer, model, data or
process group exists, so a bad value costs nothing and destroys nothing.
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import re
import sys
import time

import torch

import parallel_state
from kernels.fast_paths import detect_fast_paths
from models import DecoderModel, build_model
from models.layers.tensor_parallel import TPContext
from models.parallel_context import CPContext, ParallelContext
from moe.context import AuxLossScale, MoEContext
from moe.layer import MoELayer
from moe.metrics import step_metrics as moe_step_metrics
from optim.factory import build_optimizer_step
from optim.loss_scale import DynamicLossScale
from optim.outer.metrics import mean_over_workers, outer_step_metrics, outer_window_metrics
from optim.step import OptimizerStepFactory, StepInputs
from parallel_state import RNGStreams, Topology
from parallel_state.collectives import all_reduce_max, all_reduce_sum
from parallel_state.comm_stats import CommStats
from trainer import distributed, faults
from trainer.checkpoint import find_latest_checkpoint, list_checkpoints
from trainer.checkpointer import Checkpointer, RunState
from trainer.config import Config, to_yaml
from trainer.data import DataPipeline, load_tokenizer, prepare
from trainer.data.context_split import zigzag_split
from trainer.distributed import RuntimeEnv
from trainer.kernel_report import describe_kernels, kernel_plan
from trainer.metrics import build_sinks, console_line, drop_metrics_after, run_provenance
from trainer.mfu import peak_tflops
from trainer.pipeline import (
    PipelineChunks,
    PipelineTiming,
    forward_backward_no_pipelining,
    forward_backward_pipelining,
    pipeline_orders,
)
from trainer.precision import cast_parameters, precision_of
from trainer.profiling import StepProfiler
from trainer.rank_metrics import RankSample, gather_samples, peak_memory_bytes, straggler_lines, summarize
from trainer.validation import ConfigError, validate

log = logging.getLogger("foldtron")


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN/Inf loss or gradient norm and trainer.nan_policy says stop."""


def resolve_vocab(cfg: Config) -> Config:
    """Fill model.vocab_size from the tokenizer, or check that the configured one can hold it."""
    vocab = load_tokenizer(cfg.data.tokenizer, cfg.data.eod_token).vocab_size
    if cfg.model.vocab_size is None:
        return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    if cfg.model.vocab_size < vocab:
        raise ConfigError("model.vocab_size", cfg.model.vocab_size,
                          f"smaller than the tokenizer's vocabulary ({vocab}, data.tokenizer={cfg.data.tokenizer})",
                          f"set model.vocab_size >= {vocab}, or null to take it from the tokenizer")
    return cfg


def default_run_dir(cfg: Config) -> str:
    return os.path.join("runs", cfg.name, time.strftime("%Y%m%d-%H%M%S"))


def setup_logging(run_dir: str | None, env: RuntimeEnv) -> None:
    """Console for every rank (rank 0 at INFO, others WARNING); rank 0 also writes run_dir/train.log."""
    root = logging.getLogger("foldtron")
    root.handlers.clear()
    root.propagate = False
    root.setLevel(logging.INFO if env.is_writer else logging.WARNING)
    prefix = "" if env.world_size == 1 else f"[rank{env.rank}] "
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter(prefix + "%(message)s"))
    root.addHandler(console)
    if run_dir is not None and env.is_writer:
        file_handler = logging.FileHandler(os.path.join(run_dir, "train.log"))
        file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        root.addHandler(file_handler)
    # Library modules log under their own names (trainer.checkpoint, ...): route them the same way.
    for name in ("trainer", "models", "optim"):
        lib = logging.getLogger(name)
        lib.handlers, lib.propagate, lib.level = list(root.handlers), False, root.level


class Trainer:
    """One training run. `Trainer(cfg).train()` does everything `launch/train.py` promises."""

    def __init__(self, cfg: Config, env: RuntimeEnv | None = None,
                 optimizer_step: OptimizerStepFactory = build_optimizer_step):
        """Validate, then build in a fixed order: layout, run directory, data, model, optimizer step,
        resume, logging. `optimizer_step` builds the step from `StepInputs` (optim/step.py)."""
        self.env = env or RuntimeEnv.from_environ()
        faults.check_restart_policy(cfg.trainer.resume, cfg.trainer.run_dir)  # torchrun --max-restarts
        topology = validate(cfg, self.env.world_size)
        self.cfg = cfg = resolve_vocab(cfg)
        self._build_layout(topology)
        self._build_run_dir()
        self._build_data()
        self._build_model()
        self._build_optimizer_step(optimizer_step)
        self.step = 0  # optimizer steps completed
        self.skipped_in_a_row = 0
        self.last_non_finite: str | None = None  # where the last non-finite step went wrong (faults.py)
        self.resume()
        self._build_logging()

    def _build_layout(self, topology: Topology) -> None:
        """Device, process groups, RNG streams and the communication counters."""
        t = self.cfg.trainer
        self.device = distributed.select_device(self.env, t.device)
        if self.device.type == "cpu":
            torch.set_num_threads(t.num_threads or max(1, (os.cpu_count() or 1) // self.env.local_world_size))
        distributed.init_world(self.env, self.device, self.cfg.parallel.timeout_s)
        # Every group of the ParallelState counts its bytes here (logged per step, then reset).
        self.comm_stats = CommStats()
        self.ps = parallel_state.init(topology, device=self.device, timeout_s=self.cfg.parallel.timeout_s,
                                      stats=self.comm_stats)
        self.rng = RNGStreams(self.cfg.seed, self.ps.coords, self.device)
        # With an outer optimizer's workers, dp is per worker; the data splits over every worker's ranks.
        self.dp_rank, self.dp_size = self.ps.data_rank, self.ps.data_size

    def _build_run_dir(self) -> None:
        """The run directory every rank agrees on, the log files and the resolved config."""
        self.run_dir = distributed.broadcast_from_writer(self.cfg.trainer.run_dir or default_run_dir(self.cfg))
        if self.env.is_writer:
            os.makedirs(self.run_dir, exist_ok=True)
        distributed.barrier()
        setup_logging(self.run_dir, self.env)
        if self.env.is_writer:
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(to_yaml(self.cfg))

    def _build_data(self) -> None:
        """Fetch and tokenize on one rank; the others wait and then find it cached."""
        data_cfg = self.cfg.data
        prepared = prepare(data_cfg) if self.env.is_writer else None
        distributed.barrier()
        self.data = DataPipeline(data_cfg, seed=self.cfg.seed, dp_rank=self.dp_rank, dp_size=self.dp_size,
                                 prepared=prepared or prepare(data_cfg))

    def _build_model(self) -> None:
        """This rank's model chunks, the meta-device full model (counts, FLOPs) and the MoE layers."""
        cfg = self.cfg
        # Weights are seeded by parameter name inside build_model; dropout draws from self.rng's
        # streams. The default generator is seeded too so no stray draw depends on the process' past.
        torch.manual_seed(cfg.seed)
        self.tp = TPContext(self.ps.tp, cfg.parallel.sequence_parallel, self.rng)
        self.cp = CPContext(self.ps.cp, cfg.parallel.cp_comm)
        # MoE aux losses receive the loss contract's factor (1 / global loss tokens), set per step.
        self.aux_loss_scale = AuxLossScale()
        moe = MoEContext.from_parallel_state(self.ps, self.tp.sp, self.aux_loss_scale)
        par = ParallelContext(tp=self.tp, cp=self.cp, moe=moe)
        self.pipelined = self.ps.pp.size > 1
        if self.pipelined:
            self.model = PipelineChunks(cfg.model, cfg.seed, self.device, par, self.ps, cfg.parallel.vpp,
                                        cfg.parallel.pipeline_layers)
            self.pp_orders = pipeline_orders(self.ps.pp.size, cfg.parallel.vpp, self.data.num_microbatches)
        else:
            self.model = build_model(cfg.model, seed=cfg.seed, device=self.device, par=par)
        # The whole model on meta (no memory): parameter counts and FLOPs describe it, not this shard.
        with torch.device("meta"):
            self.full_model = DecoderModel(cfg.model, par=par)
        # Dropout on the residual stream: replicated over TP unless SP splits the sequence over it.
        self.dropout_stream = "tp-sharded" if self.tp.sp else "tp-replicated"
        moe_named = [(name, m) for name, m in self.model.named_modules() if isinstance(m, MoELayer)]
        self.moe_layers = [m for _, m in moe_named]
        # Global layer index of each ("layers.5.moe..." and, in pipeline chunks, "chunks.1.layers.5...").
        self.moe_layer_ids = [int(re.search(r"(?:^|\.)layers\.(\d+)\.", name).group(1)) for name, _ in moe_named]
        # Receive waits of this rank's pipeline schedule, summed over a log window (perf/pipeline_idle_fraction).
        self.pipeline_timing = PipelineTiming()
        self.cfg_has_moe = "moe" in cfg.model.channel_mixers
        # Checkpoints hold global tensors (any layout loads them); the layout string decides only
        # whether the per-rank RNG states carry over.
        layout = f"{self.ps.topology!r} vpp={cfg.parallel.vpp} pipeline_layers={cfg.parallel.pipeline_layers}"
        self.checkpointer = Checkpointer(self.run_dir, self.env.rank, self.env.world_size, layout,
                                         cfg.trainer.keep_last, asynchronous=cfg.trainer.async_save)
        # trainer.precision: the weights' dtype (bf16/fp16 keep fp32 masters in the optimizer step),
        # autocast for bf16_autocast, a dynamic loss scale for fp16.
        self.precision = precision_of(cfg.trainer.precision)
        cast_parameters([self.model], self.precision.param_dtype)
        if cfg.trainer.load is not None:  # weights only, before the optimizer takes its masters from them
            self.checkpointer.load(cfg.trainer.load, self.model, None, "trainer.load")
            log.info("loaded the weights of %s", cfg.trainer.load)
        self.autocast = self.precision.autocast(self.device)
        o = cfg.optim
        self.loss_scale = (DynamicLossScale(o.initial_loss_scale, o.loss_scale_window, o.min_loss_scale)
                           if self.precision.loss_scaling else None)

    def _build_optimizer_step(self, factory: OptimizerStepFactory) -> None:
        cfg = self.cfg
        self.optim_step = factory(StepInputs(
            named_params=list(self.model.named_parameters()), cfg=cfg.optim, max_steps=cfg.trainer.max_steps,
            ps=self.ps, bucket_size_mb=cfg.parallel.dp_bucket_mb,
            tied_weight=self.model.tied_weight() if self.pipelined else None, modules=[self.model],
            microbatches=self.data.num_microbatches))
        self.optimizer = self.optim_step.optimizer

    def _build_logging(self) -> None:
        """Throughput and MFU inputs, the metric sinks, and the start-up report."""
        cfg, t = self.cfg, self.cfg.trainer
        self.tokens_per_step = cfg.data.global_batch_size * cfg.data.seq_len
        self.flops_per_token = self.full_model.flops_per_token(cfg.data.seq_len)
        self.peak_tflops, peak_source = peak_tflops(self.device, self.precision.peak_key, t.peak_tflops)
        resume_step = self.step if self.step > 0 else None  # checkpoints are saved after a step, never at 0
        self.sinks = (build_sinks(cfg.logger, self.run_dir, {**dataclasses.asdict(cfg), "run": run_provenance()},
                                  resume_step)
                      if self.env.is_writer else [])
        log.info("foldtron: run_dir=%s device=%s precision=%s", self.run_dir, self.device, t.precision)
        log.info("layout: %s", self.ps.topology)
        log.info("model: %.2fM parameters (%.2fM without embeddings), %.1f MFLOPs/token (train), vocab %d",
                 self.full_model.num_parameters() / 1e6,
                 self.full_model.num_parameters(exclude_embeddings=True) / 1e6,
                 self.flops_per_token / 1e6, cfg.model.vocab_size)
        log.info("batch: %d sequences x %d tokens = %d tokens/step, %d microbatches of %d per rank, dp=%d",
                 cfg.data.global_batch_size, cfg.data.seq_len, self.tokens_per_step,
                 self.data.num_microbatches, cfg.data.micro_batch_size, self.dp_size)
        log.info("MFU peak: %.2f TFLOP/s per device (%s)", self.peak_tflops, peak_source)
        log.info(describe_kernels(kernel_plan(cfg.model, self.device, t.precision, self.ps.etp.size),
                                  detect_fast_paths()))

    # ---- state -------------------------------------------------------------------------------

    def run_state(self) -> RunState:
        """What a checkpoint keeps besides the tensors (the step is the schedule's and the data's position)."""
        rng = {"torch": torch.get_rng_state(), "streams": self.rng.state_dict()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return RunState(step=self.step, skipped_in_a_row=self.skipped_in_a_row,
                        loss_scale=self.loss_scale.state_dict() if self.loss_scale is not None else None, rng=rng)

    def load_run_state(self, state: RunState) -> None:
        self.step = state.step
        self.skipped_in_a_row = state.skipped_in_a_row
        if self.loss_scale is not None and state.loss_scale is not None:
            self.loss_scale.load_state_dict(state.loss_scale)
        if state.rng is not None:  # saved in this layout: the same random streams continue
            torch.set_rng_state(state.rng["torch"])
            self.rng.load_state_dict(state.rng["streams"])
            if "cuda" in state.rng and self.device.type == "cuda":
                torch.cuda.set_rng_state(state.rng["cuda"], self.device)

    def resume(self) -> None:
        """trainer.resume: everything (weights, optimizer, step, RNG in the same layout) from a
        checkpoint of any layout; auto takes the newest complete one of run_dir."""
        mode = self.cfg.trainer.resume
        if mode == "none":
            return
        if hasattr(self.optim_step, "load_checkpoint"):  # the DeepSpeed engine: its own format (docs/deepspeed.md)
            state = self.optim_step.load_checkpoint(os.path.join(self.run_dir, "deepspeed"), mode)
            if state is not None:
                self.load_run_state(RunState(**state["run_state"]))
                log.info("resumed from DeepSpeed checkpoint %s at step %d", state["path"], self.step)
            return
        path = self._agreed_latest_checkpoint() if mode == "auto" else mode
        if path is None:
            log.info("resume=auto: no complete checkpoint in %s, starting from step 0", self.run_dir)
            return
        self.optim_step.finish_param_sync()
        self.load_run_state(self.checkpointer.load(path, self.model, self.optim_step, "trainer.resume"))
        log.info("resumed from %s at step %d", path, self.step)
        if self.env.is_writer:
            dropped = drop_metrics_after(self.run_dir, self.step)
            if dropped:
                log.info("metrics.jsonl: dropped %d rows logged after step %d (rolled back by the resume)",
                         dropped, self.step)

    def _agreed_latest_checkpoint(self) -> str | None:
        """The newest complete checkpoint as every rank sees it (the oldest of their answers, should a
        rank see a directory the others do not yet)."""
        found = find_latest_checkpoint(self.run_dir)
        step = int(os.path.basename(found[0]).removeprefix("step_")) if found is not None else -1
        agreed = -all_reduce_max(-torch.tensor(step, dtype=torch.int64), self.ps.world).item()
        if agreed < 0:
            return None
        return dict(list_checkpoints(self.run_dir))[agreed]

    def save(self) -> None:
        """Checkpoint the current step (in the background with trainer.async_save)."""
        if hasattr(self.optim_step, "save_checkpoint"):  # the DeepSpeed engine: its own format (docs/deepspeed.md)
            self.optim_step.save_checkpoint(os.path.join(self.run_dir, "deepspeed"), f"step_{self.step}",
                                            {"run_state": dataclasses.asdict(self.run_state())})
            return
        self.optim_step.finish_param_sync()  # the weights the checkpoint holds must be the updated ones
        path = self.checkpointer.save(self.model, self.optim_step, self.run_state(), to_yaml(self.cfg),
                                      barrier=distributed.barrier)
        if self.checkpointer.asynchronous:
            log.info("saving checkpoint %s in the background", path)

    # ---- steps -------------------------------------------------------------------------------

    def _to_device(self, microbatch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in microbatch.items()}

    def _local(self, microbatches: list[dict]) -> list[dict]:
        """This rank's part of each microbatch: under context parallelism its zigzag chunks, with
        their original positions in position_ids; otherwise the microbatch itself."""
        if self.cp.size == 1:
            return microbatches
        return [zigzag_split(mb, self.cp.size, self.cp.rank) for mb in microbatches]

    def _loss_sum(self, microbatch: dict) -> torch.Tensor:
        mb = self._to_device(microbatch)
        with self.autocast, self.rng.fork(self.dropout_stream):
            # Without CP the tokens are in order: no position_ids, so the fused causal kernel applies.
            token_losses = self.model.token_losses(mb["input_ids"], mb["labels"], mb.get("position_ids"))
        return (token_losses.float() * mb["loss_mask"]).sum()

    def train_step(self) -> dict[str, float]:
        """One optimizer step on global batch `self.step`; returns its loss, lr and grad norm."""
        self.model.train()
        data_start = time.perf_counter()
        microbatches = self._local(self.data.train_microbatches(self.step))
        data_time = time.perf_counter() - data_start
        # Summed over DP x CP: the loss tokens of the global batch (docs/loss_and_layout.md,
        # "Loss normalisation").
        local_tokens = sum(mb["loss_mask"].sum() for mb in microbatches)
        sync_start = time.perf_counter()  # ranks meet here first: a late one makes the others wait
        num_tokens = all_reduce_sum(torch.as_tensor(local_tokens, dtype=torch.float32), self.ps.dp_cp)
        wait_time = time.perf_counter() - sync_start
        # fp16: backward runs on loss x scale (dividing by num_tokens / scale), the step divides it out.
        scale = self.loss_scale.scale if self.loss_scale is not None else 1.0
        self.aux_loss_scale.value = scale / max(float(num_tokens), 1.0)
        divisor = (num_tokens / scale).to(self.device)
        if self.pipelined:
            loss_sum = self._pipeline(microbatches, divisor)
        elif hasattr(self.optim_step, "forward_backward"):  # the DeepSpeed engine runs the backward
            loss_sum = self.optim_step.forward_backward(self._loss_sum, microbatches, divisor)
        else:
            loss_sum = forward_backward_no_pipelining(self._loss_sum, microbatches, divisor,
                                                      no_sync=self.optim_step.no_sync)
        reduce_start = time.perf_counter()  # the gradient reductions wait for the slowest replica
        grad_norm = self.optim_step.reduce_and_clip(unscale=1.0 / scale)
        wait_time += time.perf_counter() - reduce_start
        # Normalised over this worker's tokens (one worker: the global batch); logged as the mean over
        # workers once per log window (a per-step reduction over workers would tie them together).
        loss = (self._global_sum(loss_sum) / num_tokens).item()
        update = math.isfinite(loss) and math.isfinite(grad_norm)
        scaling = self._update_loss_scale(loss, grad_norm, scale)
        if update:
            self.skipped_in_a_row = 0
        elif not scaling.get("overflow"):
            self._handle_non_finite(loss, grad_norm, microbatches, divisor)
        lr = self.optim_step.apply(self.step, update)
        self.optim_step.zero_grad()
        self.step += 1
        return {"loss": loss, "lr": lr, "grad_norm": grad_norm, "data_time_s": data_time, "wait_time_s": wait_time,
                **scaling,
                **self._moe_step(),
                **outer_step_metrics(self.optim_step)}

    def _update_loss_scale(self, loss: float, grad_norm: float, scale: float) -> dict[str, float]:
        """fp16: a step with a finite loss whose gradients overflowed is skipped and halves the scale
        (not a non-finite step for trainer.nan_policy); clean steps count toward doubling it."""
        if self.loss_scale is None or not math.isfinite(loss):
            return {}
        overflow = not math.isfinite(grad_norm)
        self.loss_scale.update(overflow)
        if overflow:
            log.warning("step %d: fp16 gradients overflowed at loss scale %g; update skipped, loss scale -> %g",
                        self.step + 1, scale, self.loss_scale.scale)
        return {"loss_scale": scale, "overflow": float(overflow)}

    def _moe_step(self) -> dict[str, float]:
        """Once per global batch: the aux-loss-free bias step and the MoE metrics (moe.metrics)."""
        if not self.cfg_has_moe:
            return {}
        return moe_step_metrics(self.moe_layers, self.cfg.model.moe, self.ps.tp_dp_cp, self.ps.world,
                                layer_ids=self.moe_layer_ids, num_layers=self.cfg.model.num_layers)

    def _global_sum(self, loss_sum: torch.Tensor) -> torch.Tensor:
        """A loss sum over the whole global batch: the last pipeline stage has it, DP x CP split it."""
        loss_sum = loss_sum.detach().float().cpu()
        if self.pipelined:
            loss_sum = all_reduce_sum(loss_sum, self.ps.pp)
        return all_reduce_sum(loss_sum, self.ps.dp_cp)

    def _pipeline(self, microbatches: list[dict], num_tokens: torch.Tensor, forward_only: bool = False) -> torch.Tensor:
        """Forward (and backward) of the microbatches through the pipeline; this rank's loss sum."""
        head = self.model.head_chunk
        cfg = self.cfg

        def loss_sum_fn(logits: torch.Tensor, mb: dict) -> torch.Tensor:
            return (head.losses_from_logits(logits, mb["labels"]).float() * mb["loss_mask"]).sum()

        seq_per_rank = cfg.data.seq_len // self.cp.size // (self.tp.size if self.tp.sp else 1)
        shape = (cfg.data.micro_batch_size, seq_per_rank, cfg.model.hidden_size)
        with self.autocast, self.rng.fork(self.dropout_stream):
            return forward_backward_pipelining(
                self.pp_orders, self.model.stage_fns(), [self._to_device(mb) for mb in microbatches], loss_sum_fn,
                num_tokens, self.ps.pp, cfg.parallel.vpp, shape, self.precision.param_dtype, self.device,
                forward_only=forward_only, no_sync=self.optim_step.no_sync,
                timing=None if forward_only else self.pipeline_timing)

    def _handle_non_finite(self, loss: float, grad_norm: float, microbatches: list[dict],
                           divisor: torch.Tensor) -> None:
        t = self.cfg.trainer
        # Where it started, found after the fact by re-running the step with hooks (trainer/faults.py).
        self.last_non_finite = self._locate_non_finite(microbatches, divisor)
        what = f"step {self.step + 1}: loss={loss} grad_norm={grad_norm} ({self.last_non_finite})"
        if t.nan_policy == "skip" and self.skipped_in_a_row < t.max_skipped_steps:
            self.skipped_in_a_row += 1
            log.warning("%s is not finite; skipping this update (%d in a row, trainer.max_skipped_steps=%d)",
                        what, self.skipped_in_a_row, t.max_skipped_steps)
            return
        raise NonFiniteLossError(
            f"{what} is not finite. Try a lower optim.lr or longer optim.schedule.warmup_steps, "
            f"optim.clip_grad=1.0, trainer.precision=fp32, or check the data; "
            f"trainer.nan_policy=skip skips such steps (up to trainer.max_skipped_steps).")

    def _locate_non_finite(self, microbatches: list[dict], divisor: torch.Tensor) -> str:
        def rerun() -> None:
            if hasattr(self.optim_step, "forward_backward"):  # the DeepSpeed engine owns the backward: forward only
                with torch.no_grad():
                    for mb in microbatches:
                        self._loss_sum(mb)
                return
            with self.optim_step.no_sync():  # gradients of the re-run are never reduced (zeroed after)
                if self.pipelined:
                    self._pipeline(microbatches, divisor)
                else:
                    forward_backward_no_pipelining(self._loss_sum, microbatches, divisor)

        def gather(findings: dict) -> list[dict]:
            if self.env.world_size == 1:
                return [findings]
            found: list = [None] * self.env.world_size
            torch.distributed.all_gather_object(found, findings)
            return found

        with self.comm_stats.paused():
            return faults.diagnose_non_finite(self.model, self.cfg.model.num_layers, rerun, self.rng, gather)

    def evaluate(self) -> float:
        """Mean token loss over the fixed validation batches (trainer.eval_iters global batches).

        Its collectives are not counted: per-step communication bytes describe training steps only.
        """
        with self.comm_stats.paused():
            return self._evaluate()

    @torch.no_grad()
    def _evaluate(self) -> float:
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float32)
        tokens = torch.zeros((), dtype=torch.float32)
        microbatches = self._local(self.data.val_microbatches(self.cfg.trainer.eval_iters))
        if self.pipelined:  # in groups of a training step's microbatches: the orders are built for that many
            per_step = self.data.num_microbatches
            for start in range(0, len(microbatches), per_step):
                loss_sum += self._pipeline(microbatches[start:start + per_step], torch.ones(()),
                                           forward_only=True).cpu()
        else:
            for mb in microbatches:
                loss_sum += self._loss_sum(mb).cpu()
        for mb in microbatches:
            tokens += mb["loss_mask"].sum()
        return mean_over_workers((self._global_sum(loss_sum) / all_reduce_sum(tokens, self.ps.dp_cp)).item(),
                                 self.ps.outer)

    # ---- loop --------------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Train to trainer.max_steps; returns the last logged metrics (with the final val_loss)."""
        t = self.cfg.trainer
        start_step, loop_start = self.step, time.perf_counter()
        self.comm_stats.reset()  # set-up traffic (resume agreement, process groups) is not a step's
        window: list[dict[str, float]] = []
        window_time, train_time = 0.0, 0.0
        last: dict[str, float] = {}
        profiler = StepProfiler(list(t.profile_steps), list(t.profile_ranks), self.env.rank, self.run_dir, self.device)
        guard = faults.FaultGuard(self.ps, self.comm_stats, self.run_dir, t.time_limit, self.cfg.parallel.timeout_s)
        try:
            guard.start()
            while self.step < t.max_steps:
                tic = time.perf_counter()
                with profiler.step(self.step + 1):
                    window.append(self.train_step())
                dt = time.perf_counter() - tic
                window_time += dt
                train_time += dt
                is_last = self.step == t.max_steps
                # SIGTERM or trainer.time_limit on any rank: log, save and stop after this step, everywhere.
                stop = faults.STOP_NONE if is_last else guard.agreed_stop()
                metrics: dict[str, float] | None = None
                if self.step % t.log_interval == 0 or is_last or stop:
                    metrics = self._window_metrics(window, window_time)
                    window, window_time = [], 0.0
                if (t.eval_interval and self.step % t.eval_interval == 0) or (is_last and t.eval_at_end):
                    metrics = metrics if metrics is not None else {}
                    metrics["val_loss"] = self.evaluate()
                if metrics:
                    steps_done = self.step - start_step
                    eta = (t.max_steps - self.step) * train_time / max(steps_done, 1)
                    self._emit(metrics, time.perf_counter() - loop_start, eta)
                    last.update(metrics)
                if (t.save_interval and self.step % t.save_interval == 0) or (is_last and t.save_final) or stop:
                    self.save()
                if stop:
                    self._stop(guard, stop)
        except RuntimeError as e:
            timeout = guard.translate(e)
            if timeout is None:
                raise
            raise timeout from e
        finally:
            guard.close()
            profiler.close()
            self.optim_step.finish_param_sync()  # the caller may read the trained weights
            self.checkpointer.wait()  # the last save is on disk when train() returns
            for sink in self.sinks:
                sink.close()
        if "val_loss" in last:
            log.info("final validation loss %.4f nats/token vs unigram entropy of the corpus %.4f nats/token",
                     last["val_loss"], self.data.unigram_entropy)
        return last

    def _stop(self, guard: faults.FaultGuard, code: int) -> None:
        """After the checkpoint of this step: wait for it to be on disk and stop (RunStopped)."""
        guard.stopping = True
        self.checkpointer.wait()
        reason = guard.stop.describe(code)
        path = os.path.join(self.run_dir, "checkpoints", f"step_{self.step:06d}")
        log.warning("step %d: %s; saved %s, stopping (continue with trainer.resume=auto)", self.step, reason, path)
        if self.env.is_writer:  # for a scheduler's script, which sees torchrun's status, not the ranks'
            faults.write_stop_marker(self.run_dir, self.step, reason, path)
        raise faults.RunStopped(reason, self.step, path)

    def _window_metrics(self, window: list[dict[str, float]], seconds: float) -> dict[str, float]:
        tokens_per_s = self.tokens_per_step * len(window) / max(seconds, 1e-9)
        across_ranks = self._rank_metrics(window, seconds)  # reads this window's bytes before the drain
        return {
            "loss": mean_over_workers(sum(m["loss"] for m in window) / len(window), self.ps.outer),
            "lr": window[-1]["lr"],
            "grad_norm": window[-1]["grad_norm"],
            "tokens_per_s": tokens_per_s,
            "mfu": self.flops_per_token * tokens_per_s / (self.peak_tflops * 1e12 * self.env.world_size),
            "step_time_s": seconds / len(window),
            "tokens": float(self.step * self.tokens_per_step),
            # Bytes this rank sent per step, by group and collective (see parallel_state.comm_stats).
            **{key: value / len(window) for key, value in self._drain_comm_stats().items()},
            # fp16: the loss scale of the window's last step and how many steps overflowed (skipped).
            **({"loss_scale": window[-1]["loss_scale"], "overflow_steps": sum(m["overflow"] for m in window)}
               if "loss_scale" in window[-1] else {}),
            # MoE: aux losses per routed token and load imbalance (max / mean tokens per expert).
            **{key: _window_mean([m[key] for m in window]) for key in window[-1] if key.startswith("moe/")},
            **outer_window_metrics(window),  # outer optimizer: round, staleness, |Delta|, wait
            **across_ranks,
        }

    def _rank_metrics(self, window: list[dict], seconds: float) -> dict:
        """Every rank's step time, data time, peak memory, pipeline idle fraction and bytes, gathered
        in one collective (not counted as a step's traffic); names the stragglers (trainer/rank_metrics.py)."""
        timing, self.pipeline_timing = self.pipeline_timing, PipelineTiming()
        # Busy time: the step without the time spent waiting for other ranks (the first all-reduce, the
        # gradient reductions, pipeline receives). In synchronous training every rank's step time is the
        # slowest rank's; the busy time tells which rank that is.
        waits = sum(m["wait_time_s"] for m in window) + timing.wait_s
        sample = RankSample(
            step_time_s=seconds / len(window),
            busy_time_s=max(seconds - waits, 0.0) / len(window),
            data_time_s=sum(m["data_time_s"] for m in window) / len(window),
            peak_mem_bytes=peak_memory_bytes(self.device),
            pipeline_idle=timing.idle_fraction if self.pipelined else math.nan,
            comm={key: value / len(window) for key, value in self.comm_stats.bytes_sent.items()})
        with self.comm_stats.paused():
            samples = gather_samples(sample, self.ps.world)
        factor = self.cfg.trainer.straggler_factor
        metrics, stragglers = summarize(samples, factor)
        for line in straggler_lines(samples, stragglers, factor):
            log.warning("step %d: %s", self.step, line)
        return metrics

    def _drain_comm_stats(self) -> dict[str, float]:
        summary = self.comm_stats.summary()
        self.comm_stats.reset()
        return summary

    def _emit(self, metrics: dict[str, float], elapsed: float, eta: float) -> None:
        if "loss" in metrics:
            log.info(console_line(self.step, self.cfg.trainer.max_steps, metrics, elapsed, eta,
                                  bar=self.cfg.trainer.progress_bar))
        else:
            log.info("step %d | val %.4f", self.step, metrics["val_loss"])
        for sink in self.sinks:
            sink.log(self.step, {**metrics, "elapsed_s": elapsed})


def _window_mean(values: list):
    """The mean over a log window of scalars, or element-wise of equal-length lists."""
    if isinstance(values[0], list):
        return [sum(column) / len(values) for column in zip(*values)]
    return sum(values) / len(values)


def train(cfg: Config) -> dict[str, float]:
    """Validate, build and train; tears the process group down however it ends."""
    try:
        return Trainer(cfg).train()
    finally:
        distributed.shutdown_world()
