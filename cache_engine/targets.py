"""Model knowledge: where each transformer family keeps its blocks and attention, and how it is called.

Method code never names a model; it asks a :class:`ModelLayout` built here. Families missing from the
table fall back to the name patterns of the reference implementation (block lists named ``blocks``,
``transformer_blocks``, ``single_transformer_blocks``, ``layers``, ...; attention found by class).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

TensorFormat = Literal["BCHW", "BCFHW", "BFCHW", "BSC"]
AttentionKind = Literal["spatial", "temporal", "cross"]

# Children of the denoiser holding transformer blocks, as the reference implementation names them.
BLOCK_CONTAINER_NAMES = (
    "blocks",
    "transformer_blocks",
    "single_transformer_blocks",
    "temporal_transformer_blocks",
    "layers",
    "visual_transformer_blocks",
)
TEMPORAL_BLOCK_CONTAINER_NAMES = ("temporal_transformer_blocks",)


@dataclass(frozen=True)
class FamilySpec:
    """What the table knows about one transformer family."""

    name: str
    transformer_classes: tuple[str, ...]
    # The pipeline hands the transformer a rescaled timestep; value = offset + scale * argument puts it
    # back on the 0..1000 scale that timestep ranges in configs are written in.
    timestep_scale: float = 1.0
    timestep_offset: float = 0.0
    timestep_argument: str = "timestep"
    output_format: TensorFormat = "BCHW"
    kind: Literal["image", "video"] = "image"
    # Arguments besides the usual ones that carry the CFG batch (uncond half, then cond half).
    cfg_batched_arguments: tuple[str, ...] = ()


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("flux", ("FluxTransformer2DModel",), timestep_scale=1000.0, output_format="BSC"),
    FamilySpec("flux2", ("Flux2Transformer2DModel",), timestep_scale=1000.0, output_format="BSC"),
    FamilySpec("qwenimage", ("QwenImageTransformer2DModel",), timestep_scale=1000.0, output_format="BSC"),
    FamilySpec("sd3", ("SD3Transformer2DModel",), cfg_batched_arguments=("pooled_projections",)),
    FamilySpec("cogview4", ("CogView4Transformer2DModel",)),
    FamilySpec("pixart", ("PixArtTransformer2DModel",)),
    FamilySpec("cogvideox", ("CogVideoXTransformer3DModel",), output_format="BFCHW", kind="video"),
    FamilySpec("wan", ("WanTransformer3DModel",), output_format="BCFHW", kind="video"),
    FamilySpec("hunyuan_video", ("HunyuanVideoTransformer3DModel",), output_format="BCFHW", kind="video"),
    FamilySpec("ltx", ("LTXVideoTransformer3DModel",), output_format="BSC", kind="video"),
    FamilySpec(
        "mochi",
        ("MochiTransformer3DModel",),
        timestep_scale=-1.0,
        timestep_offset=1000.0,
        output_format="BCFHW",
        kind="video",
    ),
)

GENERIC_FAMILY = FamilySpec("generic", ())

# Which element of a block's tuple output is the image stream, and which the text stream. Blocks
# returning a bare tensor need no entry.
_BLOCK_OUTPUTS: Mapping[str, tuple[int, int | None]] = {
    "FluxTransformerBlock": (1, 0),
    "FluxSingleTransformerBlock": (1, 0),
    "Flux2TransformerBlock": (1, 0),
    "Flux2SingleTransformerBlock": (0, None),
    "JointTransformerBlock": (1, 0),
    "QwenImageTransformerBlock": (1, 0),
    "CogVideoXBlock": (0, 1),
    "CogView4TransformerBlock": (0, 1),
    "HunyuanVideoTransformerBlock": (0, 1),
    "HunyuanVideoSingleTransformerBlock": (0, 1),
    "HunyuanVideoTokenReplaceTransformerBlock": (0, 1),
    "HunyuanVideoTokenReplaceSingleTransformerBlock": (0, 1),
    "MochiTransformerBlock": (0, 1),
    "BasicTransformerBlock": (0, None),
    "LTXVideoTransformerBlock": (0, None),
    "WanTransformerBlock": (0, None),
}


def family_for(transformer: nn.Module) -> FamilySpec:
    class_names = {cls.__name__ for cls in type(transformer).__mro__}
    for spec in FAMILIES:
        if class_names.intersection(spec.transformer_classes):
            return spec
    return GENERIC_FAMILY


class _ArgumentReader:
    """Reads a named argument of a forward call whether it came by keyword or by position."""

    def __init__(self, module: nn.Module) -> None:
        parameters = list(inspect.signature(type(module).forward).parameters)[1:]
        self._positions = {name: index for index, name in enumerate(parameters)}

    def get(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if name in kwargs:
            return kwargs[name]
        index = self._positions.get(name)
        if index is None or index >= len(args):
            return None
        return args[index]


@dataclass(frozen=True, eq=False)
class BlockSite:
    name: str
    module: nn.Module
    hidden_states_index: int | None
    encoder_hidden_states_index: int | None
    reader: _ArgumentReader = field(repr=False)

    def argument(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        return self.reader.get(name, args, kwargs)


@dataclass(frozen=True, eq=False)
class AttentionSite:
    name: str
    module: nn.Module
    kind: AttentionKind


@dataclass(frozen=True, eq=False)
class ModelLayout:
    """Where the caching methods may act on one transformer, and how its calls look."""

    family: FamilySpec
    denoiser: nn.Module
    blocks: tuple[BlockSite, ...]
    attention: tuple[AttentionSite, ...]
    modules: Mapping[str, nn.Module]
    denoiser_reader: _ArgumentReader = field(repr=False)

    @property
    def block_modules(self) -> frozenset[nn.Module]:
        return frozenset(site.module for site in self.blocks)

    @property
    def attention_modules(self) -> frozenset[nn.Module]:
        return frozenset(site.module for site in self.attention)

    def timestep_from_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        return self.denoiser_reader.get(self.family.timestep_argument, args, kwargs)

    def to_denoising_timestep(self, raw: Any) -> float | None:
        if raw is None:
            return None
        if isinstance(raw, torch.Tensor):
            raw = raw.reshape(-1)[0].item() if raw.numel() else None
            if raw is None:
                return None
        return self.family.timestep_offset + self.family.timestep_scale * float(raw)


def is_attention_module(module: nn.Module) -> bool:
    # Imported here: the table is the one place in the engine allowed to know diffusers' classes.
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models.attention_processor import Attention, MochiAttention

    return isinstance(module, (Attention, MochiAttention, AttentionModuleMixin))


def _attention_kind(name: str, module: nn.Module) -> AttentionKind:
    if getattr(module, "is_cross_attention", False):
        return "cross"
    container = name.split(".", 1)[0]
    return "temporal" if container in TEMPORAL_BLOCK_CONTAINER_NAMES else "spatial"


def build_layout(transformer: nn.Module) -> ModelLayout:
    spec = family_for(transformer)
    blocks: list[BlockSite] = []
    for container_name, container in transformer.named_children():
        if container_name not in BLOCK_CONTAINER_NAMES or not isinstance(container, nn.ModuleList):
            continue
        for index, block in enumerate(container):
            hidden_index, encoder_index = _BLOCK_OUTPUTS.get(type(block).__name__, (0, None))
            blocks.append(
                BlockSite(
                    name=f"{container_name}.{index}",
                    module=block,
                    hidden_states_index=hidden_index,
                    encoder_hidden_states_index=encoder_index,
                    reader=_ArgumentReader(block),
                )
            )
    modules = dict(transformer.named_modules())
    attention = tuple(
        AttentionSite(name=name, module=module, kind=_attention_kind(name, module))
        for name, module in modules.items()
        if name and is_attention_module(module)
    )
    return ModelLayout(
        family=spec,
        denoiser=transformer,
        blocks=tuple(blocks),
        attention=attention,
        modules=modules,
        denoiser_reader=_ArgumentReader(transformer),
    )
