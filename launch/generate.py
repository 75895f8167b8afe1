"""Sample from a trained checkpoint: greedy decoding with a KV cache (attention) or the recurrent
state (GLA, ParaRNN), on one process or on tp ranks.

    .venv/bin/python launch/generate.py --run-dir runs/quickstart/<stamp> --prompt "ROMEO:" --max-new-tokens 50
    .venv/bin/torchrun --nproc-per-node=2 launch/generate.py --run-dir ... --prompt "ROMEO:"   # tp = 2

The model's config and weights come from the run directory's newest complete checkpoint (global
tensors, so a run trained in any layout loads on one process or on tp ranks). The
prompt is read once (prefill) into the caches, then each new token is one call on one position.
Ladder-residual models decode the same way: their deferred TP reductions overlap the next module
at every step (bench/ladder.py measures it). Decoding runs without sequence or context parallelism.
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from omegaconf import OmegaConf

from models import build_model
from models.decode_cache import DecodeCache
from models.layers.tensor_parallel import TPContext
from models.model import DecoderModel
from models.parallel_context import ParallelContext
from parallel_state.collectives import gather_from_tp_region
from parallel_state.groups import AxisGroup
from trainer.checkpoint import CONFIG_FILE, META_FILE, find_latest_checkpoint
from trainer.checkpointer import Checkpointer
from trainer.config import Config, to_config
from trainer.data.tokenizer import load_tokenizer


@dataclass
class Generation:
    """Greedy decoding's result: prompt + new tokens [B, P + N], and the full-vocabulary logits
    [B, vocab] from which each new token was chosen (N of them)."""

    tokens: torch.Tensor
    step_logits: list[torch.Tensor]


def full_vocab_logits(model: DecoderModel, logits: torch.Tensor) -> torch.Tensor:
    """This rank's vocabulary slice -> the whole vocabulary (padding dropped), on every TP rank."""
    return gather_from_tp_region(logits, model.tp.group)[..., :model.cfg.vocab_size]


@torch.inference_mode()
def greedy_generate(model: DecoderModel, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
    """Decode `max_new_tokens` greedily after `prompt` [B, P], reusing every layer's cache."""
    caches = {i: DecodeCache() for i in model.layer_ids}
    batch, length = prompt.shape
    positions = torch.arange(length, device=prompt.device).expand(batch, length)
    logits = model(prompt, positions, caches=caches)[:, -1]
    tokens, step_logits = [prompt], []
    for step in range(max_new_tokens):
        full = full_vocab_logits(model, logits)
        step_logits.append(full)
        token = full.argmax(dim=-1, keepdim=True)
        tokens.append(token)
        if step + 1 < max_new_tokens:
            position = torch.full_like(token, length + step)
            logits = model(token, position, caches=caches)[:, -1]
    return Generation(torch.cat(tokens, dim=1), step_logits)


@torch.inference_mode()
def greedy_generate_uncached(model: DecoderModel, prompt: torch.Tensor, max_new_tokens: int) -> Generation:
    """The reference: the whole sequence through the model again for every new token."""
    tokens, step_logits = prompt, []
    for _ in range(max_new_tokens):
        full = full_vocab_logits(model, model(tokens)[:, -1])
        step_logits.append(full)
        tokens = torch.cat([tokens, full.argmax(dim=-1, keepdim=True)], dim=1)
    return Generation(tokens, step_logits)


def load_model(run_dir: str, tp: AxisGroup | None = None, device: str = "cpu") -> tuple[DecoderModel, Config]:
    """This rank's shard of the model of the newest complete checkpoint in `run_dir` (eval mode),
    and the run's config. Checkpoints hold global tensors, so any tp loads them."""
    found = find_latest_checkpoint(run_dir)
    if found is None:
        raise FileNotFoundError(f"{run_dir} holds no complete checkpoint (checkpoints/step_*/ with {META_FILE})")
    path, _ = found
    cfg = to_config(OmegaConf.load(os.path.join(path, CONFIG_FILE)))
    tp = tp if tp is not None else AxisGroup.single("tp")
    par = ParallelContext(tp=TPContext(tp, sequence_parallel=False))
    model = build_model(cfg.model, seed=cfg.seed, device=device, par=par)
    Checkpointer(run_dir, rank=tp.ranks[tp.rank], world_size=tp.size, layout=f"generate-tp{tp.size}",
                 keep_last=0).load(path, model, None, field="--run-dir")
    return model.eval(), cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a training run directory (holds checkpoints/)")
    parser.add_argument("--prompt", default="\n", help="text to continue")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()
    tp = AxisGroup.single("tp")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # torchrun: every rank is one TP rank of the model
        import torch.distributed as dist
        dist.init_process_group("gloo")
        tp = AxisGroup("tp", dist.group.WORLD, tuple(range(world)), dist.get_rank())
    model, cfg = load_model(args.run_dir, tp)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    prompt = torch.tensor([tokenizer.encode(args.prompt)], dtype=torch.long)
    out = greedy_generate(model, prompt, args.max_new_tokens)
    if tp.rank == 0:
        print(tokenizer.decode(out.tokens[0].tolist()))


if __name__ == "__main__":
    main()
