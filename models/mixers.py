"""The mixer registry: every token and channel mixer name and the class behind it (docs/mixers.md).

One table. The name tuples the config checks use (`TOKEN_MIXERS`, `CHANNEL_MIXERS`, re-exported by
models.spec and models) and the classes a decoder block builds are both read from it, so a name
cannot be accepted by validation and then fail to build, or the other way round.

Every class is built as ``cls(cfg: ModelConfig, par: ParallelContext | None)`` and shards itself;
the interface a mixer implements is in docs/mixers.md.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from models.layers.attention import Attention
from models.layers.gla import GatedLinearAttention
from models.layers.mla import MultiHeadLatentAttention
from models.layers.mlp import SwiGLUMLP
from models.layers.moe import MoEMixer
from models.layers.pararnn import ParaGRUMixer, ParaLSTMMixer

TOKEN, CHANNEL = "token", "channel"


@dataclass(frozen=True)
class MixerEntry:
    """One registered mixer: its role in a decoder layer and its class."""

    # TOKEN: mixes across positions, forward(x, position_ids); CHANNEL: mixes features, forward(x).
    role: str
    cls: type[nn.Module]


# name -> mixer. A name is also the module's attribute in its block (`layers.3.attention.wq.weight`),
# so token and channel mixers share one namespace.
MIXERS: dict[str, MixerEntry] = {
    "attention": MixerEntry(TOKEN, Attention),
    "gla": MixerEntry(TOKEN, GatedLinearAttention),
    "mla": MixerEntry(TOKEN, MultiHeadLatentAttention),
    "pararnn_gru": MixerEntry(TOKEN, ParaGRUMixer),
    "pararnn_lstm": MixerEntry(TOKEN, ParaLSTMMixer),
    "mlp": MixerEntry(CHANNEL, SwiGLUMLP),
    "moe": MixerEntry(CHANNEL, MoEMixer),
}

TOKEN_MIXER_CLASSES = {name: entry.cls for name, entry in MIXERS.items() if entry.role == TOKEN}
CHANNEL_MIXER_CLASSES = {name: entry.cls for name, entry in MIXERS.items() if entry.role == CHANNEL}
TOKEN_MIXERS = tuple(TOKEN_MIXER_CLASSES)
CHANNEL_MIXERS = tuple(CHANNEL_MIXER_CLASSES)
_FIELDS = {TOKEN: "token_mixers", CHANNEL: "channel_mixers"}


def mixer_class(name: str, role: str) -> type[nn.Module]:
    """The class of mixer `name` in `role`; ValueError naming the config field and the available names."""
    classes = TOKEN_MIXER_CLASSES if role == TOKEN else CHANNEL_MIXER_CLASSES
    if name not in classes:
        raise ValueError(f"model.{_FIELDS[role]} contains {name!r}, which is not implemented; "
                         f"available: {', '.join(classes)}")
    return classes[name]
