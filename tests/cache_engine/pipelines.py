"""Tiny, real diffusers pipelines for the cache engine's tests, built by the tiny-pipeline factory.

Every family is a ``tiny_pipelines`` pipeline (the genuine diffusers pipeline and transformer classes,
shrunk to a few blocks and a few dozen tokens, seeded random weights, nothing downloaded) without its
text encoders: the prompt embeddings are fed directly, and the pipelines return latents
(``output_type="latent"``), so the VAE only gives the pipeline its compression ratios. A whole 10-step
run takes tens of milliseconds on one CPU thread. The sizes assume one intra-op thread
(``torch.set_num_threads(1)``): with more, OpenMP's waiting on a busy shared machine costs far more
than these tensors can gain.

``FAMILY_INFO`` records, per family, what an adapter table needs to know: how the timestep reaches
the transformer, the layout of its output, where its blocks and attention modules are, and how the
classifier-free-guidance branches arrive. ``tests/cache_engine/test_pipelines.py`` checks that table
against the live modules, so it cannot drift from the diffusers version installed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from tiny_pipelines import tiny_pipeline

FAMILIES: tuple[str, ...] = ("flux", "cogvideox", "wan", "hunyuan_video", "ltx", "sd3", "cogview4", "pixart")
# Built like the families above, for the tests that name them, but not run through every test of the
# engine: Wan 2.2 TI2V 5B (a timestep per token).
OTHER_FAMILIES: tuple[str, ...] = ("wan22_5b",)

CFG_MODES: tuple[str, ...] = ("distilled", "batched", "separate")

NUM_INFERENCE_STEPS = 10

# Prompt length, in tokens: enough for cross attention to matter.
TEXT_LEN = 8


@dataclass(frozen=True)
class FamilyInfo:
    """What the engine's model table needs to know about one family, checked by the tests.

    ``timestep_scale`` is the value the transformer's ``timestep`` argument has at the start of
    denoising (1000 when the pipeline passes scheduler timesteps unchanged, 1 when it divides them
    by 1000). ``output_layout`` names the axes of the transformer's ``sample`` output; ``BSC`` is a
    packed token sequence. ``transformer_positional`` lists the transformer arguments the pipeline
    passes by position rather than by keyword. ``block_outputs`` is the order of the tensors a block
    returns (the same for every block list of the family; SD3's last block returns ``None`` for
    ``encoder_hidden_states``), and ``blocks_positional`` says whether the transformer calls its
    blocks with positional arguments. ``cache_contexts`` are the names the pipeline passes to
    ``transformer.cache_context`` per CFG mode (empty when the transformer has no ``CacheMixin``).
    """

    pipeline_class: str
    transformer_class: str
    timestep_kwarg: str
    timestep_scale: int
    output_layout: str
    block_lists: tuple[str, ...]
    attention_modules: tuple[str, ...]
    transformer_positional: tuple[str, ...]
    block_outputs: tuple[str, ...]
    blocks_positional: bool
    cfg_modes: tuple[str, ...]
    cache_contexts: dict[str, tuple[str, ...]]

    @property
    def default_cfg(self) -> str:
        return self.cfg_modes[0]


# Wan's layout, which Wan 2.2 TI2V 5B (a timestep per token) shares.
_WAN = FamilyInfo(
    pipeline_class="WanPipeline",
    transformer_class="WanTransformer3DModel",
    timestep_kwarg="timestep",
    timestep_scale=1000,
    output_layout="BCFHW",
    block_lists=("blocks",),
    attention_modules=("blocks.{i}.attn1", "blocks.{i}.attn2"),
    transformer_positional=(),
    block_outputs=("hidden_states",),
    blocks_positional=True,
    cfg_modes=("separate", "distilled"),
    cache_contexts={"separate": ("cond", "uncond"), "distilled": ("cond",)},
)

FAMILY_INFO: dict[str, FamilyInfo] = {
    "flux": FamilyInfo(
        pipeline_class="FluxPipeline",
        transformer_class="FluxTransformer2DModel",
        timestep_kwarg="timestep",
        timestep_scale=1,
        output_layout="BSC",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        attention_modules=("transformer_blocks.{i}.attn", "single_transformer_blocks.{i}.attn"),
        transformer_positional=(),
        block_outputs=("encoder_hidden_states", "hidden_states"),
        blocks_positional=False,
        cfg_modes=("distilled", "separate"),
        cache_contexts={"distilled": ("cond",), "separate": ("cond", "uncond")},
    ),
    "cogvideox": FamilyInfo(
        pipeline_class="CogVideoXPipeline",
        transformer_class="CogVideoXTransformer3DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BFCHW",
        block_lists=("transformer_blocks",),
        attention_modules=("transformer_blocks.{i}.attn1",),
        transformer_positional=(),
        block_outputs=("hidden_states", "encoder_hidden_states"),
        blocks_positional=False,
        cfg_modes=("batched", "distilled"),
        cache_contexts={"batched": ("cond_uncond",), "distilled": ("cond_uncond",)},
    ),
    "wan": _WAN,
    # Wan 2.2 TI2V 5B's text-to-video: Wan's layout, with a timestep per token (expand_timesteps).
    "wan22_5b": _WAN,
    "hunyuan_video": FamilyInfo(
        pipeline_class="HunyuanVideoPipeline",
        transformer_class="HunyuanVideoTransformer3DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BCFHW",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        attention_modules=("transformer_blocks.{i}.attn", "single_transformer_blocks.{i}.attn"),
        transformer_positional=(),
        block_outputs=("hidden_states", "encoder_hidden_states"),
        blocks_positional=True,
        cfg_modes=("distilled", "separate"),
        cache_contexts={"distilled": ("cond",), "separate": ("cond", "uncond")},
    ),
    "ltx": FamilyInfo(
        pipeline_class="LTXPipeline",
        transformer_class="LTXVideoTransformer3DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BSC",
        block_lists=("transformer_blocks",),
        attention_modules=("transformer_blocks.{i}.attn1", "transformer_blocks.{i}.attn2"),
        transformer_positional=(),
        block_outputs=("hidden_states",),
        blocks_positional=False,
        cfg_modes=("batched", "distilled"),
        cache_contexts={"batched": ("cond_uncond",), "distilled": ("cond_uncond",)},
    ),
    "sd3": FamilyInfo(
        pipeline_class="StableDiffusion3Pipeline",
        transformer_class="SD3Transformer2DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BCHW",
        block_lists=("transformer_blocks",),
        attention_modules=("transformer_blocks.{i}.attn",),
        transformer_positional=(),
        block_outputs=("encoder_hidden_states", "hidden_states"),
        blocks_positional=False,
        cfg_modes=("batched", "distilled"),
        cache_contexts={"batched": (), "distilled": ()},
    ),
    "cogview4": FamilyInfo(
        pipeline_class="CogView4Pipeline",
        transformer_class="CogView4Transformer2DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BCHW",
        block_lists=("transformer_blocks",),
        attention_modules=("transformer_blocks.{i}.attn1",),
        transformer_positional=(),
        block_outputs=("hidden_states", "encoder_hidden_states"),
        blocks_positional=True,
        cfg_modes=("separate", "distilled"),
        cache_contexts={"separate": ("cond", "uncond"), "distilled": ("cond",)},
    ),
    "pixart": FamilyInfo(
        pipeline_class="PixArtSigmaPipeline",
        transformer_class="PixArtTransformer2DModel",
        timestep_kwarg="timestep",
        timestep_scale=1000,
        output_layout="BCHW",
        block_lists=("transformer_blocks",),
        attention_modules=("transformer_blocks.{i}.attn1", "transformer_blocks.{i}.attn2"),
        transformer_positional=("hidden_states",),
        block_outputs=("hidden_states",),
        blocks_positional=True,
        cfg_modes=("batched", "distilled"),
        cache_contexts={"batched": (), "distilled": ()},
    ),
}


@dataclass(frozen=True)
class FamilyCall:
    """How the engine tests call one family's tiny pipeline.

    The prompt embeddings are as wide as the transformer's config entries ``text_dim`` and
    ``pooled_dim`` say. ``guidance_arg`` carries ``guidance`` when the unconditional branch runs and
    1.0 (no guidance) in the ``distilled`` mode; ``fixed`` are further arguments of every call.
    Sizes give images a 16x16 latent (an 8x8 token grid after 2x2 patching) and videos 3 latent
    frames of 8x8, so a frequency split over H and W still has content.
    """

    tiny: str
    width: int
    text_dim: str
    pooled_dim: str | None = None
    mask: bool = False
    num_frames: int | None = None
    guidance: float = 5.0
    guidance_arg: str = "guidance_scale"
    fixed: Mapping[str, Any] = field(default_factory=dict)


CALLS: dict[str, FamilyCall] = {
    # The pipeline passes ``timestep=t / 1000`` (the transformer scales it back) and packs 2x2 latent
    # patches into tokens. No guidance embedding: ``distilled`` is a single conditional call, and
    # ``separate`` is true CFG.
    "flux": FamilyCall(
        "flux",
        width=64,
        text_dim="joint_attention_dim",
        pooled_dim="pooled_projection_dim",
        guidance=4.0,
        guidance_arg="true_cfg_scale",
    ),
    "cogvideox": FamilyCall("cogvideox", width=64, num_frames=9, text_dim="text_embed_dim", guidance=6.0),
    "wan": FamilyCall("wan", width=64, num_frames=9, text_dim="text_dim"),
    # Its VAE compresses 16x in space: 128 px make an 8x8 latent, 4x4 tokens after 2x2 patching.
    "wan22_5b": FamilyCall("wan22_5b", width=128, num_frames=9, text_dim="text_dim"),
    # Guidance is embedded (the released model is guidance-distilled); ``separate`` adds true CFG.
    "hunyuan_video": FamilyCall(
        "hunyuan_video",
        width=64,
        num_frames=9,
        text_dim="text_embed_dim",
        pooled_dim="pooled_projection_dim",
        mask=True,
        guidance=4.0,
        guidance_arg="true_cfg_scale",
        fixed={"guidance_scale": 6.0},
    ),
    # The pipeline packs the latents into tokens (1x1x1 patches) before the transformer call. The VAE
    # compresses 32x in space and 8x in time.
    "ltx": FamilyCall("ltx", width=256, num_frames=17, text_dim="caption_channels", mask=True, guidance=3.0),
    "sd3": FamilyCall("sd3", width=64, text_dim="joint_attention_dim", pooled_dim="pooled_projection_dim"),
    "cogview4": FamilyCall("cogview4", width=64, text_dim="text_embed_dim"),
    # The output is noise and learned variance, concatenated on channels. The scheduler predicts
    # epsilon, and untrained weights make a poor one, so the final latents are large (std in the
    # hundreds, against about 1 for the other families): compare them relative to their norm.
    "pixart": FamilyCall(
        "pixart_sigma",
        width=128,
        text_dim="caption_channels",
        mask=True,
        guidance=4.5,
        fixed={
            # Binning snaps the size to the released aspect-ratio tables, which have no sizes this small.
            "use_resolution_binning": False,
            # The default negative prompt is "", which the pipeline refuses next to negative embeddings.
            "negative_prompt": None,
        },
    ),
}


@dataclass
class TinyPipeline:
    """A built pipeline and the arguments that run it (all but ``generator``)."""

    family: str
    pipe: DiffusionPipeline
    call_kwargs: dict[str, Any]
    cfg: str


def _call_kwargs(
    call: FamilyCall, config: Mapping[str, Any], cfg: str, gen: torch.Generator
) -> dict[str, Any]:
    def embeddings(prefix: str) -> dict[str, torch.Tensor]:
        found = {f"{prefix}prompt_embeds": torch.randn(1, TEXT_LEN, config[call.text_dim], generator=gen)}
        if call.pooled_dim is not None:
            found[f"{prefix}pooled_prompt_embeds"] = torch.randn(1, config[call.pooled_dim], generator=gen)
        if call.mask:
            found[f"{prefix}prompt_attention_mask"] = torch.ones(1, TEXT_LEN, dtype=torch.long)
        return found

    kwargs: dict[str, Any] = {
        **embeddings(""),
        "height": call.width,
        "width": call.width,
        "max_sequence_length": TEXT_LEN,
        **call.fixed,
    }
    if call.num_frames is not None:
        kwargs["num_frames"] = call.num_frames
    if cfg == "distilled":
        kwargs[call.guidance_arg] = 1.0
    else:
        kwargs.update(embeddings("negative_"))
        kwargs[call.guidance_arg] = call.guidance
    return kwargs


def build(family: str, *, cfg: str | None = None, seed: int = 0) -> TinyPipeline:
    """Build the tiny pipeline of ``family`` with seeded weights and prompt embeddings.

    ``cfg`` picks one of ``FAMILY_INFO[family].cfg_modes`` (default: the family's natural mode).
    The same ``(family, cfg, seed)`` always gives the same weights and the same call arguments.
    """
    if family not in FAMILY_INFO:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    info = FAMILY_INFO[family]
    mode = info.default_cfg if cfg is None else cfg
    if mode not in info.cfg_modes:
        raise ValueError(f"{family} supports cfg modes {info.cfg_modes}, not {mode!r}")

    call = CALLS[family]
    pipe = tiny_pipeline(call.tiny).build(seed, text_encoders=False)
    pipe.set_progress_bar_config(disable=True)
    # The embeddings draw from a generator of their own, so they do not depend on the weights.
    kwargs = _call_kwargs(call, pipe.transformer.config, mode, torch.Generator("cpu").manual_seed(seed + 1))
    kwargs.update(num_inference_steps=NUM_INFERENCE_STEPS, output_type="latent", return_dict=True)
    return TinyPipeline(family=family, pipe=pipe, call_kwargs=kwargs, cfg=mode)


def run(tp: TinyPipeline, *, seed: int = 0) -> torch.Tensor:
    """Run the pipeline once from the seeded initial noise and return the final latents (fp32)."""
    # DiffusionPipeline itself declares no __call__; every concrete pipeline class does.
    call = cast("Callable[..., Any]", tp.pipe)
    output = call(**tp.call_kwargs, generator=torch.Generator("cpu").manual_seed(seed))
    # Image pipelines name the field ``images``, video pipelines ``frames``; it is the first either way.
    latents = output[0]
    assert isinstance(latents, torch.Tensor)
    return latents.float()


def clone_with_shared_transformer(tp: TinyPipeline) -> TinyPipeline:
    """A second pipeline around the very same transformer module, with everything else its own.

    Schedulers keep per-run state (step index, timesteps, solver history), so two concurrent runs
    must not share one; the VAE is copied too so the transformer is the only shared object.
    """
    # Built by hand rather than with ``from_pipe``, which casts the new pipeline (and so the shared
    # transformer) with ``.to(dtype)``.
    source = tp.pipe
    components = source.components
    init_kwargs = {
        name: components[name] if name in components else source.config[name]
        for name in inspect.signature(type(source).__init__).parameters
        if name in components or name in source.config
    }
    init_kwargs.update(scheduler=copy.deepcopy(source.scheduler), vae=copy.deepcopy(source.vae))
    pipe = type(source)(**init_kwargs)
    pipe.set_progress_bar_config(disable=True)
    kwargs = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in tp.call_kwargs.items()}
    return TinyPipeline(family=tp.family, pipe=pipe, call_kwargs=kwargs, cfg=tp.cfg)
