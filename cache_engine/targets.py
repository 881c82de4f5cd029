"""Model knowledge: where each transformer family keeps its blocks and attention, and how it is called.

Method code never names a model; it asks a :class:`ModelLayout` built here. Families missing from the
table fall back to the name patterns of the reference implementation (block lists named ``blocks``,
``transformer_blocks``, ``single_transformer_blocks``, ``layers``, ...; attention found by class), and
their timestep's name and scale are read from the model and its first call. Block classes carry their
stream conventions in ``BLOCK_CONVENTIONS``; one missing there is read from its ``forward``'s source, or
the methods replaying a residual over blocks are refused on it. ``tests/cache_engine/
test_every_transformer.py`` holds every class diffusers exports to this.
"""

from __future__ import annotations

import ast
import functools
import inspect
import textwrap
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, cast

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
class BlockConvention:
    """How one block class takes and returns its streams.

    ``hidden`` and ``encoder`` are the positions of the image and text streams in the block's output, a
    tuple where it returns both; ``encoder=None``: it returns the image stream alone, or first (it may
    still read a text stream). The arguments name the streams in its forward.
    """

    hidden: int = 0
    encoder: int | None = None
    hidden_argument: str = "hidden_states"
    encoder_argument: str = "encoder_hidden_states"


_IMAGE_ONLY = BlockConvention()
_TEXT_THEN_IMAGE = BlockConvention(hidden=1, encoder=0)
_IMAGE_THEN_TEXT = BlockConvention(hidden=0, encoder=1)


@dataclass(frozen=True)
class FamilySpec:
    """What the table knows about one transformer family."""

    name: str
    transformer_classes: tuple[str, ...]
    # The pipeline hands the transformer a rescaled timestep; value = offset + scale * argument puts it
    # back on the 0..1000 scale that timestep ranges in configs are written in. None: read from the first
    # call of a run (pipelines pass 0..1 or 0..1000; denoising starts at the top of the range).
    timestep_scale: float | None = 1.0
    timestep_offset: float = 0.0
    # None: the first of TIMESTEP_ARGUMENTS the denoiser's forward takes.
    timestep_argument: str | None = "timestep"
    output_format: TensorFormat = "BCHW"
    kind: Literal["image", "video"] = "image"
    # Arguments besides the usual ones that carry the CFG batch (uncond half, then cond half).
    cfg_batched_arguments: tuple[str, ...] = ()
    # cache-dit's block adapter for the family caches each block list apart, with decisions of its own.
    block_lists_cached_apart: bool = False
    # TeaCache's rescaling polynomial, highest power first, where its paper gives one for the family.
    teacache_coefficients: tuple[float, ...] | None = None
    # The denoiser's argument carrying the noisy latents, and whether they come as a list of per-sample
    # tensors rather than one batch (Z-Image, Cosmos 3).
    latent_argument: str = "hidden_states"
    latents_per_sample: bool = False
    # The module lists holding the denoising blocks, as dotted paths in the order forward runs them.
    # None: the lists named as the reference names them (BLOCK_CONTAINER_NAMES), in declaration order.
    block_lists: tuple[str, ...] | None = None
    # Block conventions by list, for a block class whose streams differ with the list holding it.
    list_conventions: tuple[tuple[str, BlockConvention], ...] = ()
    # Why a residual spanning blocks is wrong on this family (forward changes the hidden states between
    # blocks, or runs its lists interleaved): the methods replaying one are refused there.
    chain_problem: str | None = None
    # The pipelines call the denoiser more than once per step without naming the pass in cache_context
    # (Lumina 2, Chroma: the conditional pass, then the unconditional one): a repeated timestep starts
    # the next pass, which gets a branch of its own.
    unnamed_passes: bool = False
    # Why FasterCache cannot take the unconditional half out of a batch of both CFG passes here.
    cfg_batch_problem: str | None = None
    # Modules besides the output projection that read the blocks' output (an audio head): TaylorSeer's
    # lite mode, which predicts only the projection, is refused there.
    other_output_heads: tuple[str, ...] = ()


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
        # The image-to-video pipeline's true CFG calls the denoiser twice per step, naming neither pass.
        unnamed_passes=True,
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
    # Families served by the engine's generic rules except for what is written here: lists under names
    # of their own, time running upward (0 at pure noise, as their pipelines pass it), or work between
    # blocks that a replayed residual would count twice.
    FamilySpec(
        "aura_flow",
        ("AuraFlowTransformer2DModel",),
        timestep_scale=1000.0,
        output_format="BSC",
        block_lists=("joint_transformer_blocks", "single_transformer_blocks"),
    ),
    FamilySpec(
        "chroma",
        ("ChromaTransformer2DModel",),
        timestep_scale=1000.0,
        output_format="BSC",
        unnamed_passes=True,
    ),
    FamilySpec(
        "flux3",
        ("Flux3Transformer2DModel",),
        timestep_scale=1000.0,
        output_format="BSC",
        # txt_mode_blocks run on the text alone, at timestep 0: the same output at every step.
        block_lists=("mode_blocks.image", "single_transformer_blocks"),
    ),
    FamilySpec(
        "hidream",
        ("HiDreamImageTransformer2DModel",),
        output_format="BSC",
        timestep_argument="timesteps",
        timestep_scale=None,
        block_lists=("double_stream_blocks", "single_stream_blocks"),
        # One wrapper class holds both kinds of block; the list says which.
        list_conventions=(("double_stream_blocks", _IMAGE_THEN_TEXT), ("single_stream_blocks", _IMAGE_ONLY)),
        cfg_batch_problem="its Llama text states hold the CFG batch on their second axis",
    ),
    FamilySpec(
        "joyimage",
        ("JoyImageEditTransformer3DModel", "JoyImageEditPlusTransformer3DModel"),
        timestep_scale=None,
        block_lists=("double_blocks",),
    ),
    FamilySpec(
        "lumina2",
        ("Lumina2Transformer2DModel", "LuminaNextDiT2DModel"),
        timestep_scale=-1000.0,
        timestep_offset=1000.0,
        output_format="BSC",
        unnamed_passes=True,
    ),
    FamilySpec(
        "rising_time",
        ("Ideogram4Transformer2DModel", "MiniMaxH3Transformer3DModel", "OmniGenTransformer2DModel"),
        timestep_scale=-1000.0,
        timestep_offset=1000.0,
    ),
    FamilySpec(
        "z_image",
        ("ZImageTransformer2DModel",),
        latent_argument="x",
        latents_per_sample=True,
        timestep_argument="t",
        timestep_scale=-1000.0,
        timestep_offset=1000.0,
    ),
    FamilySpec(
        "cosmos3",
        ("Cosmos3OmniTransformer",),
        latent_argument="vision_tokens",
        latents_per_sample=True,
        timestep_argument="vision_timesteps",
        timestep_scale=None,
        output_format="BSC",
        kind="video",
    ),
    FamilySpec(
        "wan_vace",
        ("WanVACETransformer3DModel",),
        output_format="BCFHW",
        kind="video",
        chain_problem="forward adds the VACE control hints to the hidden states between blocks",
    ),
    FamilySpec(
        "wan_animate",
        ("WanAnimateTransformer3DModel",),
        output_format="BCFHW",
        kind="video",
        chain_problem="forward adds the face adapter's output to the hidden states between blocks",
    ),
    FamilySpec(
        "consisid",
        ("ConsisIDTransformer3DModel",),
        output_format="BFCHW",
        kind="video",
        chain_problem="forward adds face cross-attention to the hidden states between blocks",
    ),
    FamilySpec(
        "motif_video",
        ("MotifVideoTransformer3DModel",),
        kind="video",
        timestep_scale=None,
        chain_problem="its decoder blocks start again from the embedded latents, not from the blocks before",
    ),
    FamilySpec(
        "latte",
        ("LatteTransformer3DModel",),
        output_format="BFCHW",
        kind="video",
        chain_problem="forward interleaves its spatial and temporal block lists, reshaping between them",
    ),
    FamilySpec(
        "ltx2",
        ("LTX2VideoTransformer3DModel",),
        output_format="BSC",
        kind="video",
        timestep_scale=None,
        other_output_heads=("audio_proj_out",),
        cfg_batch_problem="it returns the sound beside the video, and only the video's half would be rebuilt",
    ),
    FamilySpec(
        "kandinsky6",
        ("Kandinsky6Transformer3DModel",),
        kind="video",
        timestep_scale=None,
        other_output_heads=("audio_out_layer",),
        cfg_batch_problem="it returns the sound beside the video, and only the video's half would be rebuilt",
    ),
)

GENERIC_FAMILY = FamilySpec("generic", (), timestep_scale=None, timestep_argument=None, unnamed_passes=True)

# What denoisers name their timestep argument, in the order a family-less model is searched for one.
TIMESTEP_ARGUMENTS = ("timestep", "timesteps", "t", "vision_timesteps", "sigma")


BLOCK_CONVENTIONS: Mapping[str, BlockConvention] = {
    "FluxTransformerBlock": _TEXT_THEN_IMAGE,
    "FluxSingleTransformerBlock": _TEXT_THEN_IMAGE,
    "Flux2TransformerBlock": _TEXT_THEN_IMAGE,
    "Flux2SingleTransformerBlock": _IMAGE_ONLY,
    "JointTransformerBlock": _TEXT_THEN_IMAGE,
    "QwenImageTransformerBlock": _TEXT_THEN_IMAGE,
    "CogVideoXBlock": _IMAGE_THEN_TEXT,
    "CogView4TransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanVideoTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanVideoSingleTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanVideoTokenReplaceTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanVideoTokenReplaceSingleTransformerBlock": _IMAGE_THEN_TEXT,
    "MochiTransformerBlock": _IMAGE_THEN_TEXT,
    "BasicTransformerBlock": _IMAGE_ONLY,
    "LTXVideoTransformerBlock": _IMAGE_ONLY,
    "WanTransformerBlock": _IMAGE_ONLY,
    # Two streams, text first.
    "AuraFlowJointTransformerBlock": _TEXT_THEN_IMAGE,
    "BriaFiboTransformerBlock": _TEXT_THEN_IMAGE,
    "BriaTransformerBlock": _TEXT_THEN_IMAGE,
    "BriaSingleTransformerBlock": _TEXT_THEN_IMAGE,
    "ChromaTransformerBlock": _TEXT_THEN_IMAGE,
    "Flux3SingleTransformerBlock": _TEXT_THEN_IMAGE,
    "LongCatImageTransformerBlock": _TEXT_THEN_IMAGE,
    "LongCatImageSingleTransformerBlock": _TEXT_THEN_IMAGE,
    "OvisImageTransformerBlock": _TEXT_THEN_IMAGE,
    "OvisImageSingleTransformerBlock": _TEXT_THEN_IMAGE,
    # Packed sequences: the understanding (text) stream first, the generated one second.
    "Cosmos3VLTextMoTDecoderLayer": BlockConvention(
        hidden=1, encoder=0, hidden_argument="gen_seq", encoder_argument="und_seq"
    ),
    # Two streams, image first.
    "CogView3PlusTransformerBlock": _IMAGE_THEN_TEXT,
    "ConsisIDBlock": _IMAGE_THEN_TEXT,
    "EasyAnimateTransformerBlock": _IMAGE_THEN_TEXT,
    "GlmImageTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanImageTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanImageSingleTransformerBlock": _IMAGE_THEN_TEXT,
    "HunyuanVideo15TransformerBlock": _IMAGE_THEN_TEXT,
    "JoyImageTransformerBlock": _IMAGE_THEN_TEXT,
    "JoyImageEditPlusTransformerBlock": _IMAGE_THEN_TEXT,
    "MotifVideoTransformerBlock": _IMAGE_THEN_TEXT,
    "MotifVideoSingleTransformerBlock": _IMAGE_THEN_TEXT,
    # Video and sound generated together: the sound is the second stream.
    "LTX2VideoTransformerBlock": BlockConvention(hidden=0, encoder=1, encoder_argument="audio_hidden_states"),
    "Kandinsky6FusedTransformerDecoderBlock": BlockConvention(
        hidden=0, encoder=1, hidden_argument="vis", encoder_argument="aud"
    ),
    # One stream out: the image alone, or text and image joined before the list.
    "AuraFlowSingleTransformerBlock": _IMAGE_ONLY,
    "BriaFiboSingleTransformerBlock": _IMAGE_ONLY,
    "ChromaSingleTransformerBlock": _IMAGE_ONLY,
    "Flux3ModeTransformerBlock": _IMAGE_ONLY,
    "AllegroTransformerBlock": _IMAGE_ONLY,
    "AnyFlowTransformerBlock": _IMAGE_ONLY,
    "BasicTransformerBlockDreamLite": _IMAGE_ONLY,
    "CosmosTransformerBlock": _IMAGE_ONLY,
    "HeliosTransformerBlock": _IMAGE_ONLY,
    "HunyuanDiTBlock": _IMAGE_ONLY,
    "Ideogram4TransformerBlock": _IMAGE_ONLY,
    "Kandinsky6SRTransformerBlock": _IMAGE_ONLY,
    "Krea2TransformerBlock": _IMAGE_ONLY,
    "Lumina2TransformerBlock": _IMAGE_ONLY,
    "LuminaNextDiTBlock": _IMAGE_ONLY,
    "MiniMaxH3TransformerBlock": _IMAGE_ONLY,
    "NucleusMoEImageTransformerBlock": _IMAGE_ONLY,
    "OmniGenBlock": _IMAGE_ONLY,
    "PRXBlock": _IMAGE_ONLY,
    "QwenImage21TransformerBlock": _IMAGE_ONLY,
    "SanaTransformerBlock": _IMAGE_ONLY,
    "SanaVideoTransformerBlock": _IMAGE_ONLY,
    "SanaWMLTX2RefinerTransformerBlock": _IMAGE_ONLY,
    "SkyReelsV2TransformerBlock": _IMAGE_ONLY,
    "WanAnimate2TransformerBlock": _IMAGE_ONLY,
    # One stream, under another name.
    "BriaFibo2TransformerBlock": BlockConvention(hidden_argument="x"),
    "ErnieImageSharedAdaLNBlock": BlockConvention(hidden_argument="x"),
    "ZImageTransformerBlock": BlockConvention(hidden_argument="x"),
    "SanaVideoMSCamCtrlBlock": BlockConvention(hidden_argument="x"),
    "Kandinsky5TransformerDecoderBlock": BlockConvention(hidden_argument="visual_embed"),
}


def block_convention(block: nn.Module) -> BlockConvention | None:
    """The table's convention for ``block``'s class or the nearest class it derives from; else the one its
    forward shows (one tensor returned: the stream of its first argument); None if neither tells."""
    for cls in type(block).__mro__:
        found = BLOCK_CONVENTIONS.get(cls.__name__)
        if found is not None:
            return found
    return _convention_from_source(cast(Hashable, type(block)))


@functools.cache
def _convention_from_source(block_class: Any) -> BlockConvention | None:
    """A block whose forward returns no tuple, no None, no call's result and no name it bound to a
    container returns one stream: the one it took first. Anything else, or no source, tells nothing."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(block_class.forward)))
    except (OSError, TypeError, SyntaxError):
        return None
    function = tree.body[0]
    if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)) or len(function.args.args) < 2:
        return None
    nodes = _own_nodes(function)
    returns = [node for node in nodes if isinstance(node, ast.Return)]
    containers = {
        target.id
        for node in nodes
        if isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Dict))
        for target in node.targets
        if isinstance(target, ast.Name)
    }
    if not returns or any(
        node.value is None
        or isinstance(node.value, (ast.Tuple, ast.List, ast.Dict, ast.Constant, ast.Call))
        or (isinstance(node.value, ast.Name) and node.value.id in containers)
        for node in returns
    ):
        # A call may return anything (a tuple from a helper); a constant is no stream.
        return None
    return BlockConvention(hidden_argument=function.args.args[1].arg)


def _own_nodes(function: ast.AST) -> list[ast.AST]:
    """The nodes of ``function``'s body, without those of functions defined inside it."""
    found: list[ast.AST] = []
    pending = list(ast.iter_child_nodes(function))
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda, ast.ClassDef)):
            continue
        found.append(node)
        pending.extend(ast.iter_child_nodes(node))
    return found


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

    def takes(self, name: str) -> bool:
        return name in self._positions

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
    # Where the image and text streams sit in the block's tuple output (see BlockConvention).
    hidden_states_index: int | None
    encoder_hidden_states_index: int | None
    reader: _ArgumentReader = field(repr=False)
    hidden_argument: str = "hidden_states"
    encoder_argument: str = "encoder_hidden_states"

    @property
    def list_name(self) -> str:
        return self.name.rsplit(".", 1)[0]

    def argument(self, name: str, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        return self.reader.get(name, args, kwargs)

    def hidden_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
        """The image stream the block was called with."""
        hidden: torch.Tensor = self.reader.get(self.hidden_argument, args, kwargs)
        return hidden

    def encoder_input(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor | None:
        """The text stream the block was called with (None where it takes none)."""
        encoder: torch.Tensor | None = self.reader.get(self.encoder_argument, args, kwargs)
        return encoder

    def inputs(
        self, args: tuple[Any, ...], kwargs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(hidden, encoder) the block was called with; encoder is None for blocks returning one stream."""
        hidden = self.hidden_input(args, kwargs)
        if self.encoder_hidden_states_index is None:
            return hidden, None
        return hidden, self.encoder_input(args, kwargs)

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
    """Where the caching methods may act on one transformer, and how its calls look. Its views (block
    lists, runs, output head) are derived once, since every request's plan reads them."""

    family: FamilySpec
    denoiser: nn.Module
    blocks: tuple[BlockSite, ...]
    attention: tuple[AttentionSite, ...]
    modules: Mapping[str, nn.Module]
    denoiser_reader: _ArgumentReader = field(repr=False)
    # The denoiser's argument carrying the timestep (None: it takes none the engine knows).
    timestep_argument: str | None = None
    # Why the methods replaying a residual over several blocks cannot act here (None: they can).
    chain_problem: str | None = None

    @property
    def block_modules(self) -> frozenset[nn.Module]:
        return frozenset(site.module for site in self.blocks)

    @functools.cached_property
    def _order(self) -> dict[nn.Module, int]:
        return {module: index for index, module in enumerate(self.denoiser.modules())}

    def position(self, module: nn.Module) -> int:
        """Where ``module`` runs in the denoiser's forward (its place in ``modules()``): calls nearer the
        input have lower positions."""
        return self._order.get(module, len(self._order))

    @functools.cached_property
    def block_names(self) -> frozenset[str]:
        return frozenset(site.name for site in self.blocks)

    @property
    def attention_modules(self) -> frozenset[nn.Module]:
        return frozenset(site.module for site in self.attention)

    @functools.cached_property
    def output_head(self) -> str | None:
        """The child module whose output is the denoiser's (up to a reshape): what TaylorSeer's lite
        mode predicts in place of the blocks. None: the denoiser has none the engine knows."""
        children = dict(self.denoiser.named_children())
        name = next((name for name in OUTPUT_HEADS if name in children), None)
        head = None if name is None else children[name]
        if isinstance(head, nn.ModuleDict):
            # One head per patch size (Z-Image): the head, where a checkpoint has a single one.
            keys = list(head)
            return f"{name}.{keys[0]}" if len(keys) == 1 else None
        return name

    @functools.cached_property
    def block_lists(self) -> tuple[tuple[BlockSite, ...], ...]:
        """The blocks grouped by the list that holds them (``transformer_blocks``, ...), in call order."""
        lists: dict[str, list[BlockSite]] = {}
        for site in self.blocks:
            lists.setdefault(site.list_name, []).append(site)
        return tuple(tuple(sites) for sites in lists.values())

    @functools.cached_property
    def stream_chains(self) -> tuple[tuple[BlockSite, ...], ...]:
        """The blocks in runs whose streams keep one layout: consecutive lists join one run unless the
        streams change between them (Flux 2 joins text and image into one stream before its single-stream
        list), seen as a change in how many streams the blocks return."""
        chains: list[list[BlockSite]] = []
        for blocks in self.block_lists:
            two_streams = blocks[0].encoder_hidden_states_index is not None
            if chains and (chains[-1][0].encoder_hidden_states_index is not None) == two_streams:
                chains[-1].extend(blocks)
            else:
                chains.append(list(blocks))
        return tuple(tuple(chain) for chain in chains)

    def timestep_from_call(self, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        if self.timestep_argument is None:
            return None
        return self.denoiser_reader.get(self.timestep_argument, args, kwargs)

    def to_denoising_timestep(self, raw: Any, first: float | None = None) -> float | None:
        """``raw`` (a timestep argument) on the 0..1000 scale; ``first`` is the run's first such value,
        which sets the scale of a family whose table gives none."""
        value = scalar_timestep(raw)
        if value is None:
            return None
        scale = self.family.timestep_scale
        if scale is None:
            start = value if first is None else first
            scale = 1000.0 if abs(start) <= 1.0 + 1e-6 else 1.0
        if _per_token(raw):
            # Wan 2.2 TI2V holds the image's tokens at 0 (clean, they condition) and denoises the others at
            # the step's timestep: the step's is its noisiest token's, on the scale where time falls.
            tokens = self.family.timestep_offset + scale * raw.reshape(raw.shape[0], -1)[0].float()
            return float(tokens.max().item())
        return self.family.timestep_offset + scale * value


def _per_token(raw: Any) -> bool:
    """Whether a timestep argument holds one per token (batch, tokens) rather than one per row."""
    return isinstance(raw, torch.Tensor) and raw.ndim > 1 and raw[0].numel() > 1


def scalar_timestep(raw: Any) -> float | None:
    """A timestep argument as one number: its first element where it holds one per row; where it holds one
    per token, the first row's largest in size (tokens held at 0 beside it tell nothing of the scale)."""
    if raw is None:
        return None
    if isinstance(raw, torch.Tensor):
        if not raw.numel():
            return None
        if _per_token(raw):
            row = raw.reshape(raw.shape[0], -1)[0]
            return float(row[row.abs().argmax()].item())
        return float(raw.reshape(-1)[0].item())
    return float(raw)


# What denoisers name the module that turns the blocks' output into theirs, in the order preferred where
# several are present (Flux's norm_out feeds its proj_out; DiT's proj_out_1 reads only the timestep).
OUTPUT_HEADS = (
    "proj_out_2",
    "proj_out",
    "final_layer",
    "out_layer",
    "final_linear",
    "norm_out",
    "all_final_layer",
)


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
    unknown: set[str] = set()
    for list_name, container in _block_lists(transformer, spec):
        for index, block in enumerate(container):
            convention = dict(spec.list_conventions).get(list_name) or block_convention(block)
            if convention is None:
                unknown.add(type(block).__name__)
                convention = _IMAGE_ONLY
            blocks.append(
                BlockSite(
                    name=f"{list_name}.{index}",
                    module=block,
                    hidden_states_index=convention.hidden,
                    encoder_hidden_states_index=convention.encoder,
                    reader=_ArgumentReader(block),
                    hidden_argument=convention.hidden_argument,
                    encoder_argument=convention.encoder_argument,
                )
            )
    chain_problem = spec.chain_problem
    if unknown and chain_problem is None:
        chain_problem = (
            f"the engine's table does not know how {', '.join(sorted(unknown))} take and return their streams"
        )
    modules = dict(transformer.named_modules())
    attention = tuple(
        AttentionSite(name=name, module=module, kind=_attention_kind(name, module))
        for name, module in modules.items()
        if name and is_attention_module(module)
    )
    reader = _ArgumentReader(transformer)
    return ModelLayout(
        family=spec,
        denoiser=transformer,
        blocks=tuple(blocks),
        attention=attention,
        modules=modules,
        denoiser_reader=reader,
        timestep_argument=_timestep_argument(spec, reader),
        chain_problem=chain_problem,
    )


def _block_lists(transformer: nn.Module, spec: FamilySpec) -> list[tuple[str, nn.ModuleList]]:
    if spec.block_lists is None:
        return [
            (name, child)
            for name, child in transformer.named_children()
            if name in BLOCK_CONTAINER_NAMES and isinstance(child, nn.ModuleList)
        ]
    found = []
    for path in spec.block_lists:
        try:
            container = transformer.get_submodule(path)
        except AttributeError:
            continue  # a list the checkpoint's config leaves out
        if isinstance(container, nn.ModuleList):
            found.append((path, container))
    return found


def _timestep_argument(spec: FamilySpec, reader: _ArgumentReader) -> str | None:
    if spec.timestep_argument is not None:
        return spec.timestep_argument
    return next((name for name in TIMESTEP_ARGUMENTS if reader.takes(name)), None)


# -- the first block's timestep-modulated input -------------------------------------------------------
# TeaCache measures how much the image stream's input to the first block's attention moved, after the
# block's norm and timestep modulation. Each reader recomputes it with the block's own modules, from the
# arguments of the block's call, exactly as the block's forward does before its attention.

_Argument = Callable[[str], Any]


def _adaln_zero(block: Any, argument: _Argument) -> torch.Tensor:
    # Flux, HunyuanVideo and SD3 blocks: AdaLayerNormZero returns (modulated, gates and shifts...).
    modulated: torch.Tensor = block.norm1(argument("hidden_states"), emb=argument("temb"))[0]
    return modulated


def _token_replace(block: Any, argument: _Argument) -> torch.Tensor:
    # HunyuanVideo-I2V's blocks: the first latent frame's tokens (the image's) are modulated at timestep 0,
    # the others at the step's, in one tensor.
    modulated: torch.Tensor = block.norm1(
        argument("hidden_states"), argument("temb"), argument("token_replace_emb"), argument("num_tokens")
    )[0]
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


def _cogview3plus(block: Any, argument: _Argument) -> torch.Tensor:
    # The joint norm of CogView3-Plus, whose blocks name the timestep embedding ``emb``.
    modulated: torch.Tensor = block.norm1(
        argument("hidden_states"), argument("encoder_hidden_states"), argument("emb")
    )[0]
    return modulated


def _scale_shift_table(block: Any, argument: _Argument) -> torch.Tensor:
    # PixArt's single table of six modulations (Sana, Allegro): the first two shift and scale the norm.
    hidden = argument("hidden_states")
    timestep = argument("timestep")
    if timestep is None:
        timestep = argument("temb")
    shift_msa, scale_msa = (block.scale_shift_table[None] + timestep.reshape(hidden.shape[0], 6, -1)).chunk(
        6, dim=1
    )[:2]
    modulated: torch.Tensor = block.norm1(hidden) * (1 + scale_msa) + shift_msa
    return modulated


def _norm_with_temb(block: Any, argument: _Argument) -> torch.Tensor:
    # Norms taking the timestep embedding and returning the modulated input first (Lumina's RMSNormZero)
    # or alone (HunyuanDiT's AdaLayerNormShift).
    normed = block.norm1(argument("hidden_states"), argument("temb"))
    modulated: torch.Tensor = normed[0] if isinstance(normed, tuple) else normed
    return modulated


def _cosmos(block: Any, argument: _Argument) -> torch.Tensor:
    modulated: torch.Tensor = block.norm1(
        argument("hidden_states"), argument("embedded_timestep"), argument("temb")
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
    "HunyuanVideoTokenReplaceTransformerBlock": _token_replace,
    "JointTransformerBlock": _adaln_zero,
    "MochiTransformerBlock": _mochi,
    "CogVideoXBlock": _joint_norm,
    "CogView4TransformerBlock": _joint_norm,
    "LTXVideoTransformerBlock": _ltx,
    "WanTransformerBlock": _wan,
    "QwenImageTransformerBlock": _qwenimage,
    "Flux2TransformerBlock": _flux2,
    "BasicTransformerBlock": _basic,
    "AuraFlowJointTransformerBlock": _adaln_zero,
    "BriaFiboTransformerBlock": _adaln_zero,
    "BriaTransformerBlock": _adaln_zero,
    "HunyuanImageTransformerBlock": _adaln_zero,
    "HunyuanVideo15TransformerBlock": _adaln_zero,
    "LongCatImageTransformerBlock": _adaln_zero,
    "MotifVideoTransformerBlock": _adaln_zero,
    "OvisImageTransformerBlock": _adaln_zero,
    "EasyAnimateTransformerBlock": _joint_norm,
    "ConsisIDBlock": _joint_norm,
    "GlmImageTransformerBlock": _joint_norm,
    "CogView3PlusTransformerBlock": _cogview3plus,
    "SkyReelsV2TransformerBlock": _wan,
    "AnyFlowTransformerBlock": _wan,
    "HeliosTransformerBlock": _wan,
    "SanaTransformerBlock": _scale_shift_table,
    "SanaVideoTransformerBlock": _scale_shift_table,
    "AllegroTransformerBlock": _scale_shift_table,
    "Lumina2TransformerBlock": _norm_with_temb,
    "LuminaNextDiTBlock": _norm_with_temb,
    "HunyuanDiTBlock": _norm_with_temb,
    "CosmosTransformerBlock": _cosmos,
}


def has_modulated_input(site: BlockSite) -> bool:
    return type(site.module).__name__ in _MODULATED_INPUTS


def modulated_input(site: BlockSite, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> torch.Tensor:
    """The image stream's timestep-modulated input to ``site``'s attention, for this call of the block."""
    reader = _MODULATED_INPUTS[type(site.module).__name__]
    return reader(site.module, lambda name: site.argument(name, args, kwargs))
