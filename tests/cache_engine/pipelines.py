"""Tiny, real diffusers pipelines for the cache engine's tests.

Every family is the genuine diffusers pipeline class wired to a genuine transformer class, shrunk to a
few blocks and a few dozen tokens so a whole 10-step run takes 30-80 ms on one CPU thread. Weights
are seeded random (nothing is downloaded), text encoders and tokenizers are absent and the prompt
embeddings are fed directly, and the pipelines return latents (``output_type="latent"``), so the VAE
is only there to give the pipeline its compression ratios (it is still a working, decodable VAE).
The sizes assume one intra-op thread (``torch.set_num_threads(1)``): with more, OpenMP's waiting on a
busy shared machine costs far more than these tensors can gain.

``FAMILY_INFO`` records, per family, what an adapter table needs to know: how the timestep reaches
the transformer, the layout of its output, where its blocks and attention modules are, and how the
classifier-free-guidance branches arrive. ``tests/cache_engine/test_pipelines.py`` checks that table
against the live modules, so it cannot drift from the diffusers version installed.
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from diffusers.models import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLHunyuanVideo,
    AutoencoderKLLTXVideo,
    AutoencoderKLWan,
    CogVideoXTransformer3DModel,
    CogView4Transformer2DModel,
    FluxTransformer2DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    PixArtTransformer2DModel,
    SD3Transformer2DModel,
    WanTransformer3DModel,
)

# Pipelines and schedulers come from their own modules: the top-level package's lazy re-exports
# resolve, for a type checker, to placeholder classes unrelated to the real ones.
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from diffusers.pipelines.cogview4.pipeline_cogview4 import CogView4Pipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import HunyuanVideoPipeline
from diffusers.pipelines.ltx.pipeline_ltx import LTXPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.pixart_alpha.pipeline_pixart_sigma import PixArtSigmaPipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import StableDiffusion3Pipeline
from diffusers.pipelines.wan.pipeline_wan import WanPipeline
from diffusers.schedulers.scheduling_ddim_cogvideox import CogVideoXDDIMScheduler
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler
from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

FAMILIES: tuple[str, ...] = ("flux", "cogvideox", "wan", "hunyuan_video", "ltx", "sd3", "cogview4", "pixart")

CFG_MODES: tuple[str, ...] = ("distilled", "batched", "separate")

NUM_INFERENCE_STEPS = 10

# Stands for the text encoders and tokenizers. diffusers annotates them as required, but each
# pipeline here skips them when it is given prompt embeddings.
_ABSENT: Any = None

# Shared tiny sizes. Two heads of 16 channels keep attention genuinely multi-head; a text sequence of
# 8 tokens is enough for cross attention to matter. Images use a 16x16 latent (an 8x8 token grid after
# 2x2 patching), videos a 3-frame 8x8 latent, so a frequency split over H and W still has content.
_HEADS = 2
_HEAD_DIM = 16
_TEXT_LEN = 8
_TEXT_DIM = 32
_POOLED_DIM = 32
_IMAGE_SIZE = 128  # pixels; a VAE compressing 8x gives a 16x16 latent
_VIDEO_SIZE = 64  # pixels; 8x compression gives an 8x8 latent per frame
_VIDEO_FRAMES = 9  # 4x temporal compression gives 3 latent frames


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
    "wan": FamilyInfo(
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
    ),
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


@dataclass
class TinyPipeline:
    """A built pipeline and the arguments that run it (all but ``generator``)."""

    family: str
    pipe: DiffusionPipeline
    call_kwargs: dict[str, Any]
    cfg: str


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _text(gen: torch.Generator) -> torch.Tensor:
    return _randn(gen, 1, _TEXT_LEN, _TEXT_DIM)


def _mask() -> torch.Tensor:
    return torch.ones(1, _TEXT_LEN, dtype=torch.long)


def _image_vae(latent_channels: int) -> AutoencoderKL:
    # Four levels give the real 8x spatial compression; four channels per level keep it cheap.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=2,
        sample_size=_IMAGE_SIZE,
        # Flux and SD3 decode with ``latents / scaling_factor + shift_factor``; None would break that.
        shift_factor=0.0,
    )


def _build_flux(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Flux: ``FluxPipeline`` + ``FluxTransformer2DModel`` (2 double-stream + 3 single-stream blocks).

    Timestep: ``timestep=t / 1000`` (the pipeline divides, the transformer multiplies back by 1000
    before its embedding), so the transformer sees values in (0, 1]. Latents are packed 2x2 patches:
    input and output ``[B, S, C]`` with S = 8*8 tokens and C = 16. Blocks:
    ``transformer_blocks.{i}`` (``FluxTransformerBlock``, joint attention ``.attn``) and
    ``single_transformer_blocks.{i}`` (``FluxSingleTransformerBlock``, ``.attn``).
    CFG: ``distilled`` has no unconditional pass (``guidance_embeds=False``, so no guidance
    embedding either); ``separate`` is true CFG, one call under ``cache_context("cond")`` and one
    under ``cache_context("uncond")`` per step.
    """
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=2,
        num_single_layers=3,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_TEXT_DIM,
        pooled_projection_dim=_POOLED_DIM,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(latent_channels=4),
        text_encoder=_ABSENT,
        tokenizer=_ABSENT,
        text_encoder_2=_ABSENT,
        tokenizer_2=_ABSENT,
        transformer=transformer,
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "pooled_prompt_embeds": _randn(gen, 1, _POOLED_DIM),
        "height": _IMAGE_SIZE,
        "width": _IMAGE_SIZE,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "separate":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["negative_pooled_prompt_embeds"] = _randn(gen, 1, _POOLED_DIM)
        kwargs["true_cfg_scale"] = 4.0
    return pipe, kwargs


# The released CogVideoX-5b scheduler settings. The class defaults describe an epsilon-predicting
# model with "leading" spacing (first timestep 875, latents blown up 10x by the random model); the
# real pipeline runs v-prediction on a zero-terminal-SNR schedule from timestep 999.
_COGVIDEOX_SCHEDULER: dict[str, Any] = {
    "prediction_type": "v_prediction",
    "rescale_betas_zero_snr": True,
    "timestep_spacing": "trailing",
    "snr_shift_scale": 1.0,
    "clip_sample": False,
}


def _build_cogvideox(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """CogVideoX: ``CogVideoXPipeline`` + ``CogVideoXTransformer3DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, integer DDIM timesteps in [0, 1000). Latents and output are
    ``[B, F, C, H, W]`` (3 x 4 x 8 x 8). Blocks: ``transformer_blocks.{i}``
    (``CogVideoXBlock``); its single attention ``.attn1`` runs over text and video tokens jointly.
    CFG: ``batched``, the pipeline concatenates [uncond, cond] on the batch axis and makes one call
    under ``cache_context("cond_uncond")``; ``distilled`` (guidance_scale 1) makes the same call
    with batch 1.
    """
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=4,
        time_embed_dim=32,
        text_embed_dim=_TEXT_DIM,
        num_layers=4,
        sample_width=_VIDEO_SIZE // 8,
        sample_height=_VIDEO_SIZE // 8,
        sample_frames=_VIDEO_FRAMES,
        patch_size=2,
        temporal_compression_ratio=4,
        # The sincos position table covers exactly this many text tokens, so it must equal the
        # prompt length passed in.
        max_text_seq_length=_TEXT_LEN,
    )
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
    )
    pipe = CogVideoXPipeline(
        tokenizer=_ABSENT,
        text_encoder=_ABSENT,
        vae=vae,
        transformer=transformer,
        scheduler=CogVideoXDDIMScheduler(**_COGVIDEOX_SCHEDULER),
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "height": _VIDEO_SIZE,
        "width": _VIDEO_SIZE,
        "num_frames": _VIDEO_FRAMES,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "batched":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["guidance_scale"] = 6.0
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


def _build_wan(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Wan 2.1: ``WanPipeline`` + ``WanTransformer3DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, flow-matching timesteps in (0, 1000]. Latents and output are
    ``[B, C, F, H, W]`` (4 x 3 x 8 x 8). Blocks: ``blocks.{i}`` (``WanTransformerBlock``) with
    self-attention ``.attn1`` and cross-attention ``.attn2``. CFG: ``separate``, one call under
    ``cache_context("cond", step_index=..., sigma=..., num_inference_steps=...)`` and one under
    ``"uncond"`` per step; ``distilled`` (guidance_scale 1) makes only the ``"cond"`` call.
    """
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=4,
        text_dim=_TEXT_DIM,
        freq_dim=32,
        ffn_dim=64,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    vae = AutoencoderKLWan(
        base_dim=4,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = WanPipeline(
        tokenizer=_ABSENT,
        text_encoder=_ABSENT,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=transformer,
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "height": _VIDEO_SIZE,
        "width": _VIDEO_SIZE,
        "num_frames": _VIDEO_FRAMES,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "separate":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["guidance_scale"] = 5.0
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


def _build_hunyuan_video(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """HunyuanVideo: ``HunyuanVideoPipeline`` + ``HunyuanVideoTransformer3DModel`` (2 + 2 blocks).

    Timestep: ``timestep=t`` unchanged, flow-matching timesteps in (0, 1000]; the embedded guidance
    arrives as ``guidance=guidance_scale * 1000``. Latents and output are ``[B, C, F, H, W]``
    (4 x 3 x 8 x 8). Blocks: ``transformer_blocks.{i}`` (``HunyuanVideoTransformerBlock``, dual
    stream, ``.attn``) and ``single_transformer_blocks.{i}`` (``HunyuanVideoSingleTransformerBlock``,
    ``.attn``); the text token refiner ``context_embedder.token_refiner.refiner_blocks.{i}.attn``
    is a further attention stack that is not a denoising block. CFG: ``distilled`` (guidance-embedded,
    the released model's mode) makes one ``cache_context("cond")`` call per step; ``separate`` adds
    true CFG (``true_cfg_scale`` > 1) with a second call under ``"uncond"``.
    """
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=_TEXT_DIM,
        pooled_projection_dim=_POOLED_DIM,
        rope_axes_dim=(4, 6, 6),
    )
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        norm_num_groups=4,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=_ABSENT,
        tokenizer=_ABSENT,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        text_encoder_2=_ABSENT,
        tokenizer_2=_ABSENT,
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "pooled_prompt_embeds": _randn(gen, 1, _POOLED_DIM),
        "prompt_attention_mask": _mask(),
        "height": _VIDEO_SIZE,
        "width": _VIDEO_SIZE,
        "num_frames": _VIDEO_FRAMES,
        "guidance_scale": 6.0,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "separate":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["negative_pooled_prompt_embeds"] = _randn(gen, 1, _POOLED_DIM)
        kwargs["negative_prompt_attention_mask"] = _mask()
        kwargs["true_cfg_scale"] = 4.0
    return pipe, kwargs


def _build_ltx(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """LTX-Video: ``LTXPipeline`` + ``LTXVideoTransformer3DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, flow-matching timesteps in (0, 1000]. Latents are packed by
    the pipeline before the call: input and output ``[B, S, C]`` with S = 3*8*8 tokens and C = 8
    (the pipeline also passes ``num_frames``, ``height`` and ``width`` of the latent grid). Blocks:
    ``transformer_blocks.{i}`` (``LTXVideoTransformerBlock``) with self-attention ``.attn1`` and
    cross-attention ``.attn2``. CFG: ``batched``, [uncond, cond] on the batch axis in one call under
    ``cache_context("cond_uncond")``; ``distilled`` (guidance_scale 1) makes it with batch 1.
    """
    transformer = LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        cross_attention_dim=_HEADS * _HEAD_DIM,
        num_layers=4,
        caption_channels=_TEXT_DIM,
    )
    # Two spatio-temporal downsamplings and patch size 1: 4x spatial and 4x temporal compression,
    # which the pipeline reads off the VAE to size the latents.
    vae = AutoencoderKLLTXVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=8,
        block_out_channels=(8, 8, 8, 8),
        decoder_block_out_channels=(8, 8, 8, 8),
        layers_per_block=(1, 1, 1, 1, 1),
        decoder_layers_per_block=(1, 1, 1, 1, 1),
        spatio_temporal_scaling=(True, True, False, False),
        decoder_spatio_temporal_scaling=(True, True, False, False),
        decoder_inject_noise=(False, False, False, False, False),
        upsample_residual=(False, False, False, False),
        upsample_factor=(1, 1, 1, 1),
        timestep_conditioning=False,
        patch_size=1,
        patch_size_t=1,
        encoder_causal=True,
        decoder_causal=False,
    )
    pipe = LTXPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=_ABSENT,
        tokenizer=_ABSENT,
        transformer=transformer,
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "prompt_attention_mask": _mask(),
        "height": _VIDEO_SIZE // 2,
        "width": _VIDEO_SIZE // 2,
        "num_frames": _VIDEO_FRAMES,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "batched":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["negative_prompt_attention_mask"] = _mask()
        kwargs["guidance_scale"] = 3.0
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


def _build_sd3(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Stable Diffusion 3: ``StableDiffusion3Pipeline`` + ``SD3Transformer2DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, flow-matching timesteps in (0, 1000]. Latents and output are
    ``[B, C, H, W]`` (4 x 16 x 16). Blocks: ``transformer_blocks.{i}`` (``JointTransformerBlock``,
    joint attention ``.attn``; the last block is ``context_pre_only``). CFG: ``batched``,
    [uncond, cond] on the batch axis; the transformer has no ``CacheMixin`` and the pipeline never
    calls ``cache_context``. ``distilled`` is guidance_scale 1, batch 1.
    """
    transformer = SD3Transformer2DModel(
        sample_size=_IMAGE_SIZE // 8,
        patch_size=2,
        in_channels=4,
        num_layers=4,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        joint_attention_dim=_TEXT_DIM,
        caption_projection_dim=_HEADS * _HEAD_DIM,
        pooled_projection_dim=_POOLED_DIM,
        out_channels=4,
        pos_embed_max_size=_IMAGE_SIZE // 8,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=_image_vae(latent_channels=4),
        text_encoder=_ABSENT,
        tokenizer=_ABSENT,
        text_encoder_2=_ABSENT,
        tokenizer_2=_ABSENT,
        text_encoder_3=_ABSENT,
        tokenizer_3=_ABSENT,
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "pooled_prompt_embeds": _randn(gen, 1, _POOLED_DIM),
        "height": _IMAGE_SIZE,
        "width": _IMAGE_SIZE,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "batched":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["negative_pooled_prompt_embeds"] = _randn(gen, 1, _POOLED_DIM)
        kwargs["guidance_scale"] = 5.0
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


def _build_cogview4(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """CogView4: ``CogView4Pipeline`` + ``CogView4Transformer2DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, flow-matching timesteps in (0, 1000]. Latents and output are
    ``[B, C, H, W]`` (4 x 16 x 16). Blocks: ``transformer_blocks.{i}``
    (``CogView4TransformerBlock``, joint attention ``.attn1``). CFG: ``separate``, one call under
    ``cache_context("cond")`` and one under ``"uncond"`` per step; ``distilled`` (guidance_scale 1)
    makes only the ``"cond"`` call.
    """
    transformer = CogView4Transformer2DModel(
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=4,
        attention_head_dim=_HEAD_DIM,
        num_attention_heads=_HEADS,
        text_embed_dim=_TEXT_DIM,
        time_embed_dim=32,
        condition_dim=8,
        sample_size=_IMAGE_SIZE // 8,
    )
    pipe = CogView4Pipeline(
        tokenizer=_ABSENT,
        text_encoder=_ABSENT,
        vae=_image_vae(latent_channels=4),
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(),
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "height": _IMAGE_SIZE,
        "width": _IMAGE_SIZE,
        "max_sequence_length": _TEXT_LEN,
    }
    if cfg == "separate":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["guidance_scale"] = 5.0
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


def _build_pixart(cfg: str, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """PixArt-Sigma: ``PixArtSigmaPipeline`` + ``PixArtTransformer2DModel`` (4 blocks).

    Timestep: ``timestep=t`` unchanged, integer DPM-Solver timesteps in [0, 1000). Latents are
    ``[B, C, H, W]`` (4 x 16 x 16); the output is ``[B, 2C, H, W]`` (noise and learned variance;
    the pipeline keeps the first half). Blocks: ``transformer_blocks.{i}``
    (``BasicTransformerBlock``) with self-attention ``.attn1`` and cross-attention ``.attn2``. CFG:
    ``batched``, [uncond, cond] on the batch axis; the transformer has no ``CacheMixin`` and the
    pipeline never calls ``cache_context``. ``distilled`` is guidance_scale 1, batch 1.
    The released scheduler predicts epsilon, and untrained weights make a poor one, so the final
    latents are large (std about 200, against about 1 for the other families): compare them
    relative to their norm.
    """
    transformer = PixArtTransformer2DModel(
        num_attention_heads=_HEADS,
        attention_head_dim=_HEAD_DIM,
        in_channels=4,
        out_channels=8,
        num_layers=4,
        cross_attention_dim=_HEADS * _HEAD_DIM,
        sample_size=_IMAGE_SIZE // 8,
        patch_size=2,
        caption_channels=_TEXT_DIM,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        num_embeds_ada_norm=1000,
        attention_bias=True,
        activation_fn="gelu-approximate",
    )
    pipe = PixArtSigmaPipeline(
        tokenizer=_ABSENT,
        text_encoder=_ABSENT,
        vae=_image_vae(latent_channels=4),
        transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    kwargs: dict[str, Any] = {
        "prompt_embeds": _text(gen),
        "prompt_attention_mask": _mask(),
        "height": _IMAGE_SIZE,
        "width": _IMAGE_SIZE,
        # Binning snaps the size to the released aspect-ratio table, which only knows real sample
        # sizes; the tiny transformer has none of them.
        "use_resolution_binning": False,
        "max_sequence_length": _TEXT_LEN,
        # The pipeline's default negative prompt is "", which it refuses next to negative embeddings.
        "negative_prompt": None,
    }
    if cfg == "batched":
        kwargs["negative_prompt_embeds"] = _text(gen)
        kwargs["negative_prompt_attention_mask"] = _mask()
        kwargs["guidance_scale"] = 4.5
    else:
        kwargs["guidance_scale"] = 1.0
    return pipe, kwargs


_BUILDERS: dict[str, Callable[[str, torch.Generator], tuple[DiffusionPipeline, dict[str, Any]]]] = {
    "flux": _build_flux,
    "cogvideox": _build_cogvideox,
    "wan": _build_wan,
    "hunyuan_video": _build_hunyuan_video,
    "ltx": _build_ltx,
    "sd3": _build_sd3,
    "cogview4": _build_cogview4,
    "pixart": _build_pixart,
}


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

    # fork_rng keeps building a pipeline from moving the caller's global RNG; the embeddings use
    # their own generator so they do not depend on how many parameters the modules drew.
    default_dtype = torch.get_default_dtype()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # Modules take the default dtype at construction; pinning it avoids a later ``.to(float32)``,
        # which diffusers warns about for modules that declare fp32-only parts.
        torch.set_default_dtype(torch.float32)
        try:
            pipe, kwargs = _BUILDERS[family](mode, torch.Generator("cpu").manual_seed(seed + 1))
        finally:
            torch.set_default_dtype(default_dtype)

    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
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
