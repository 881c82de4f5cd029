"""Model knowledge: where each transformer family keeps its blocks and attention, and how it is called.

Method code never names a model; it asks a :class:`ModelLayout` built here. Families missing from the
table fall back to the name patterns of the reference implementation (block lists named ``blocks``,
``transformer_blocks``, ``single_transformer_blocks``, ``layers``, ...; attention found by class).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
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
    # The hidden states change layout between the block lists (Flux 2 joins its text and image tokens
    # before the single-stream list), so a residual can only span one list.
    joins_streams_between_lists: bool = False
    # cache-dit's block adapter for the family caches each block list apart, with decisions of its own.
    block_lists_cached_apart: bool = False
    # TeaCache's rescaling polynomial, highest power first, where its paper gives one for the family.
    teacache_coefficients: tuple[float, ...] | None = None


# TeaCache's published polynomials (github.com/ali-vilab/TeaCache, one script per model), fitted on the
# relative L1 change of the first block's timestep-modulated input. FLUX.1-dev's, from
# TeaCache4FLUX/teacache_flux.py, as the PyPI package mlx-teacache 0.14.1 vendors it with attribution
# (mlx_teacache/variants/flux1_dev/config.py); HunyuanVideo's (TeaCache4HunyuanVideo), LTX-Video's
# (TeaCache4LTX-Video/teacache_ltx.py) and Mochi's (TeaCache4Mochi/teacache_mochi.py) as the published
# ComfyUI and diffusers ports of those scripts reproduce them, identical across them. Wan 2.1 and
# CogVideoX get none: the paper fits one per checkpoint (1.3B / 14B, 2B / 5B) on the timestep
# embedding rather than on this input.
_TEACACHE_FLUX = (4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01)
_TEACACHE_HUNYUAN_VIDEO = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)
_TEACACHE_LTX = (2.14700694e01, -1.28016453e01, 2.31279151e00, 7.92487521e-01, 9.69274326e-03)
_TEACACHE_MOCHI = (-3.51241319e03, 8.11675948e02, -6.09400215e01, 2.42429681e00, 3.05291719e-03)


FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        "flux",
        ("FluxTransformer2DModel",),
        timestep_scale=1000.0,
        output_format="BSC",
        teacache_coefficients=_TEACACHE_FLUX,
    ),
    FamilySpec(
        "flux2",
        ("Flux2Transformer2DModel",),
        timestep_scale=1000.0,
        output_format="BSC",
        joins_streams_between_lists=True,
        block_lists_cached_apart=True,
    ),
    FamilySpec("qwenimage", ("QwenImageTransformer2DModel",), timestep_scale=1000.0, output_format="BSC"),
    FamilySpec("sd3", ("SD3Transformer2DModel",), cfg_batched_arguments=("pooled_projections",)),
    FamilySpec("cogview4", ("CogView4Transformer2DModel",)),
    FamilySpec("pixart", ("PixArtTransformer2DModel",)),
    FamilySpec("cogvideox", ("CogVideoXTransformer3DModel",), output_format="BFCHW", kind="video"),
    FamilySpec("wan", ("WanTransformer3DModel",), output_format="BCFHW", kind="video"),
    FamilySpec(
        "hunyuan_video",
        ("HunyuanVideoTransformer3DModel",),
        output_format="BCFHW",
        kind="video",
        block_lists_cached_apart=True,
        teacache_coefficients=_TEACACHE_HUNYUAN_VIDEO,
    ),
    FamilySpec(
        "ltx",
        ("LTXVideoTransformer3DModel",),
        output_format="BSC",
        kind="video",
        teacache_coefficients=_TEACACHE_LTX,
    ),
    FamilySpec(
        "mochi",
        ("MochiTransformer3DModel",),
        timestep_scale=-1.0,
        timestep_offset=1000.0,
        output_format="BCFHW",
        kind="video",
        teacache_coefficients=_TEACACHE_MOCHI,
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

    def inputs(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) the block was called with; encoder is None for blocks with one stream."""
        hidden = self.argument("hidden_states", args, kwargs)
        if self.encoder_hidden_states_index is None:
            return hidden, None
        return hidden, self.argument("encoder_hidden_states", args, kwargs)

    def streams(self, output: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) out of the block's output; encoder is None for blocks with one stream."""
        if not isinstance(output, tuple):
            return output, None
        index = self.encoder_hidden_states_index
        return output[self.hidden_states_index or 0], None if index is None else output[index]

    def pack(self, hidden: torch.Tensor, encoder: torch.Tensor | None) -> Any:
        """The streams in the block's own output order."""
        if self.encoder_hidden_states_index is None:
            return hidden
        hidden_index = self.hidden_states_index or 0
        output: list[Any] = [None] * (max(hidden_index, self.encoder_hidden_states_index) + 1)
        output[hidden_index] = hidden
        output[self.encoder_hidden_states_index] = encoder
        return tuple(output)


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

    @property
    def block_lists(self) -> tuple[tuple[BlockSite, ...], ...]:
        """The blocks grouped by the list that holds them (``transformer_blocks``, ...), in call order."""
        lists: dict[str, list[BlockSite]] = {}
        for site in self.blocks:
            lists.setdefault(site.name.split(".", 1)[0], []).append(site)
        return tuple(tuple(sites) for sites in lists.values())

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


# -- the first block's timestep-modulated input -------------------------------------------------------
# TeaCache measures how much the image stream's input to the first block's attention moved, after the
# block's norm and timestep modulation. Each reader recomputes it with the block's own modules, from the
# arguments of the block's call, exactly as the block's forward does before its attention.

_Argument = Callable[[str], Any]


def _adaln_zero(block: Any, argument: _Argument) -> torch.Tensor:
    # Flux, HunyuanVideo and SD3 blocks: AdaLayerNormZero returns (modulated, gates and shifts...).
    modulated: torch.Tensor = block.norm1(argument("hidden_states"), emb=argument("temb"))[0]
    return modulated


def _mochi(block: Any, argument: _Argument) -> torch.Tensor:
    modulated: torch.Tensor = block.norm1(argument("hidden_states"), argument("temb"))[0]
    return modulated


def _joint_norm(block: Any, argument: _Argument) -> torch.Tensor:
    # CogVideoX and CogView4 normalise both streams in one module; the image stream comes first.
    modulated: torch.Tensor = block.norm1(
        argument("hidden_states"), argument("encoder_hidden_states"), argument("temb")
    )[0]
    return modulated


def _ltx(block: Any, argument: _Argument) -> torch.Tensor:
    hidden, temb = argument("hidden_states"), argument("temb")
    ada_count = block.scale_shift_table.shape[0]
    ada_values = block.scale_shift_table[None, None].to(temb.device) + temb.reshape(
        hidden.size(0), temb.size(1), ada_count, -1
    )
    shift_msa, scale_msa = ada_values.unbind(dim=2)[:2]
    modulated: torch.Tensor = block.norm1(hidden) * (1 + scale_msa) + shift_msa
    return modulated


def _wan(block: Any, argument: _Argument) -> torch.Tensor:
    hidden, temb = argument("hidden_states"), argument("temb")
    if temb.ndim == 4:  # Wan 2.2 TI2V: one modulation per token
        shift_msa, scale_msa = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)[:2]
        shift_msa, scale_msa = shift_msa.squeeze(2), scale_msa.squeeze(2)
    else:
        shift_msa, scale_msa = (block.scale_shift_table + temb.float()).chunk(6, dim=1)[:2]
    modulated: torch.Tensor = (block.norm1(hidden.float()) * (1 + scale_msa) + shift_msa).type_as(hidden)
    return modulated


def _qwenimage(block: Any, argument: _Argument) -> torch.Tensor:
    image_modulation = block.img_mod(argument("temb")).chunk(2, dim=-1)[0]
    normed = block.img_norm1(argument("hidden_states"))
    modulated: torch.Tensor = block._modulate(normed, image_modulation, argument("modulate_index"))[0]
    return modulated


def _flux2(block: Any, argument: _Argument) -> torch.Tensor:
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    shift_msa, scale_msa, _ = Flux2Modulation.split(argument("temb_mod_img"), 2)[0]
    modulated: torch.Tensor = (1 + scale_msa) * block.norm1(argument("hidden_states")) + shift_msa
    return modulated


def _basic(block: Any, argument: _Argument) -> torch.Tensor:
    # diffusers' BasicTransformerBlock (PixArt and the generic DiT): its norm type decides the modulation.
    hidden, timestep = argument("hidden_states"), argument("timestep")
    norm_type = block.norm_type
    if norm_type == "ada_norm_single":
        shift_msa, scale_msa = (
            block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)
        ).chunk(6, dim=1)[:2]
        modulated: torch.Tensor = block.norm1(hidden) * (1 + scale_msa) + shift_msa
        return modulated
    if norm_type == "ada_norm":
        ada_norm: torch.Tensor = block.norm1(hidden, timestep)
        return ada_norm
    if norm_type == "ada_norm_zero":
        class_labels = argument("class_labels")
        zero: torch.Tensor = block.norm1(hidden, timestep, class_labels, hidden_dtype=hidden.dtype)[0]
        return zero
    if norm_type == "ada_norm_continuous":
        continuous: torch.Tensor = block.norm1(hidden, argument("added_cond_kwargs")["pooled_text_emb"])
        return continuous
    plain: torch.Tensor = block.norm1(hidden)
    return plain


_MODULATED_INPUTS: Mapping[str, Callable[[Any, _Argument], torch.Tensor]] = {
    "FluxTransformerBlock": _adaln_zero,
    "HunyuanVideoTransformerBlock": _adaln_zero,
    "JointTransformerBlock": _adaln_zero,
    "MochiTransformerBlock": _mochi,
    "CogVideoXBlock": _joint_norm,
    "CogView4TransformerBlock": _joint_norm,
    "LTXVideoTransformerBlock": _ltx,
    "WanTransformerBlock": _wan,
    "QwenImageTransformerBlock": _qwenimage,
    "Flux2TransformerBlock": _flux2,
    "BasicTransformerBlock": _basic,
}


def has_modulated_input(site: BlockSite) -> bool:
    return type(site.module).__name__ in _MODULATED_INPUTS


def modulated_input(site: BlockSite, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The image stream's timestep-modulated input to ``site``'s attention, for this call of the block."""
    reader = _MODULATED_INPUTS[type(site.module).__name__]
    return reader(site.module, lambda name: site.argument(name, args, kwargs))
