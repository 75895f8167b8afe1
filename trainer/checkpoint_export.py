"""A consolidated one-process model from a checkpoint of any layout (launch/export.py).

The checkpoint already stores every weight as its global tensor under its one-process name, so an
export reads `model/*` in one process and writes them to one safetensors file, beside the run's
config. fp32 exports take a bf16 run's fp32 master weights where the checkpoint holds them (the
bf16 weights are their rounding).
"""
from __future__ import annotations

import os
import shutil

import torch

from parallel_state.errors import ConfigError
from trainer.checkpoint import CONFIG_FILE, IncompleteCheckpointError, read_meta
from trainer.checkpoint_dcp import load_whole, read_metadata, stored_shapes
from trainer.checkpointer import EXPORT_FILE, MODEL_PREFIX

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def export_checkpoint(checkpoint: str, out: str, dtype: str = "fp32") -> str:
    """Write `out`/model.safetensors (global names, `dtype`) and `out`/config.yaml; returns the file."""
    if dtype not in DTYPES:
        raise ConfigError("--dtype", dtype, f"must be one of {list(DTYPES)}", "use --dtype fp32 or --dtype bf16")
    if not os.path.isdir(checkpoint):
        raise ConfigError("CHECKPOINT", checkpoint, "no such checkpoint directory",
                          "point it at a run's checkpoints/step_XXXXXX directory")
    try:
        meta = read_meta(checkpoint, "CHECKPOINT")
    except IncompleteCheckpointError as e:
        raise ConfigError("CHECKPOINT", checkpoint, str(e), "export a complete checkpoint (one with meta.json)") from e
    metadata = read_metadata(checkpoint)
    stored = stored_shapes(metadata)
    names = [k.removeprefix(MODEL_PREFIX) for k in stored if k.startswith(MODEL_PREFIX)]
    masters = {n: f"optim/{n}/master" for n in names if dtype == "fp32" and f"optim/{n}/master" in stored}
    keys = [masters.get(n, MODEL_PREFIX + n) for n in names]
    tensors = load_whole(checkpoint, keys, metadata)
    weights = {n: tensors[k].to(DTYPES[dtype]).contiguous() for n, k in zip(names, keys)}

    from safetensors.torch import save_file

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, EXPORT_FILE)
    save_file(weights, path, metadata={"format": "foldtron-export-v1", "step": str(meta["step"]), "dtype": dtype,
                                       "source": os.path.abspath(checkpoint)})
    if os.path.isfile(os.path.join(checkpoint, CONFIG_FILE)):
        shutil.copyfile(os.path.join(checkpoint, CONFIG_FILE), os.path.join(out, CONFIG_FILE))
    return path
