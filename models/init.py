"""Layout-independent weight initialisation.

The model is constructed on the meta device and then materialised so that every weight's values
depend only on (seed, its global parameter name, its full shape) -- never on which rank, pipeline
stage or tensor-parallel shard builds it. That is what makes every parallel layout start from the
same full model.

Each module declares how its parameters are initialised with ``init_specs() -> {name: ParamInit}``
(names relative to that module, dotted names reach into children such as ``"wq.weight"``). A
tensor-parallel shard records ``shard = (dim, index, count)`` in its metadata (parallel_state.params): the full
tensor is generated and the shard's slice copied in. A padded parameter (a vocabulary padded to a
multiple of tp) also records ``unpadded = (dim, real_size)``: only the real entries are
generated, the padding is zeros.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from parallel_state.params import param_meta

INIT_KINDS = ("normal", "ones", "zeros")


@dataclass(frozen=True)
class ParamInit:
    """How the full tensor of one parameter is generated."""

    # One of INIT_KINDS.
    kind: str
    # Standard deviation for kind == "normal" (mean is 0).
    std: float = 0.0
    # Global name whose seed generates the tensor; None means the parameter's own global name.
    # A tied LM head on a stage without the embedding uses "embedding.weight" to equal it.
    seed_name: str | None = None

    def __post_init__(self) -> None:
        if self.kind not in INIT_KINDS:
            raise ValueError(f"unknown init kind {self.kind!r}; available: {', '.join(INIT_KINDS)}")


def normal_init(std: float, seed_name: str | None = None) -> ParamInit:
    """Normal(0, std) initialisation."""
    return ParamInit("normal", std, seed_name)


def ones_init() -> ParamInit:
    """All ones (norm gains)."""
    return ParamInit("ones")


def zeros_init() -> ParamInit:
    """All zeros (biases)."""
    return ParamInit("zeros")


def stable_param_seed(seed: int, name: str) -> int:
    """Seed for one parameter, stable across processes and Python runs (unlike hash())."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    # 63 bits keep it a valid non-negative seed for every torch generator.
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def generate_full_tensor(init: ParamInit, seed: int, name: str, shape: Sequence[int]) -> torch.Tensor:
    """The full fp32 CPU tensor of a parameter; depends only on (seed, seed name, shape, init)."""
    if init.kind == "ones":
        return torch.ones(tuple(shape), dtype=torch.float32)
    if init.kind == "zeros":
        return torch.zeros(tuple(shape), dtype=torch.float32)
    generator = torch.Generator(device="cpu").manual_seed(stable_param_seed(seed, init.seed_name or name))
    return torch.empty(tuple(shape), dtype=torch.float32).normal_(0.0, init.std, generator=generator)


def generate_full_tensor_padded(init: ParamInit, seed: int, name: str, shape: Sequence[int],
                                unpadded: tuple[int, int] | None) -> torch.Tensor:
    """`generate_full_tensor`, except that with `unpadded = (dim, size)` only the first `size`
    entries along `dim` are generated (as for a tensor of that size) and the rest are zeros.

    A vocabulary padded to a multiple of tp (unpadded = (0, vocab)) thus keeps the
    one-process values in its real rows whatever the padding.
    """
    if unpadded is None:
        return generate_full_tensor(init, seed, name, shape)
    dim, size = unpadded
    real_shape = list(shape)
    real_shape[dim] = size
    real = generate_full_tensor(init, seed, name, real_shape)
    pad_shape = list(shape)
    pad_shape[dim] = shape[dim] - size
    return torch.cat([real, torch.zeros(pad_shape, dtype=real.dtype)], dim=dim)


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """Shape of the unsharded tensor that `param` (possibly a shard) is a slice of."""
    shape = list(param.shape)
    shard = param_meta(param).shard
    if shard is not None:
        dim, _, count = shard
        shape[dim] *= count
    return tuple(shape)


def collect_init_specs(model: nn.Module) -> dict[str, ParamInit]:
    """Every module's `init_specs()`, keyed by the global (model-relative) parameter name."""
    specs: dict[str, ParamInit] = {}
    for prefix, module in model.named_modules():
        declare = getattr(module, "init_specs", None)
        if declare is None:
            continue
        for relative_name, init in declare().items():
            specs[f"{prefix}.{relative_name}" if prefix else relative_name] = init
    return specs


def _allocate_on_device(model: nn.Module, device: torch.device, dtype: torch.dtype) -> None:
    """Give every meta parameter and buffer real (uninitialised) storage on `device`.

    Not `Module.to_empty`: from meta it creates a new Parameter per module, which unties shared
    weights (tied embeddings) and drops attributes such as `shard` (checked on torch 2.13).
    """
    replacements: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for local_name, param in list(module.named_parameters(recurse=False)):
            new_param = replacements.get(id(param))
            if new_param is None:
                new_dtype = dtype if param.is_floating_point() else param.dtype
                storage = torch.empty(param.shape, device=device, dtype=new_dtype)
                new_param = nn.Parameter(storage, requires_grad=param.requires_grad)
                new_param.__dict__.update(param.__dict__)  # keeps `shard`, `expert` and every other marker
                replacements[id(param)] = new_param
            setattr(module, local_name, new_param)
        for local_name, buffer in list(module.named_buffers(recurse=False)):
            # Buffers keep their dtype (e.g. RoPE frequencies stay fp32); modules recompute them.
            setattr(module, local_name, torch.empty_like(buffer, device=device))


@torch.no_grad()
def materialize(
    model: nn.Module,
    seed: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> nn.Module:
    """Allocate a meta-built model on `device` and fill it from `seed`; returns the same model.

    Floating parameters get `dtype`. Values are generated in fp32 on CPU (so they do not depend on
    the device's RNG) and then cast. Each module with `reset_buffers()` recomputes its buffers.
    """
    device = torch.device(device)
    _allocate_on_device(model, device, dtype)
    specs = collect_init_specs(model)
    # named_parameters() yields a tied tensor once, under its first name (the embedding's).
    for name, param in model.named_parameters():
        init = specs.get(name)
        if init is None:
            raise ValueError(f"parameter {name!r} has no init spec; declare it in its module's init_specs()")
        full = generate_full_tensor_padded(init, seed, name, full_shape(param), param_meta(param).unpadded)
        shard = param_meta(param).shard
        if shard is not None:
            dim, index, count = shard
            full = full.chunk(count, dim)[index]
        param.copy_(full)
    for module in model.modules():
        reset_buffers = getattr(module, "reset_buffers", None)
        if reset_buffers is not None:
            reset_buffers()
    return model
