"""Seeded random-weight pipelines for the engine benchmark, large enough for timing to mean something.

Each family is the genuine diffusers pipeline class around the genuine transformer class, with
random weights (nothing is downloaded), no text encoder (prompt embeddings are passed directly) and
``output_type="latent"``, so a run is the denoising loop and nothing else. The ``bench`` scale makes
one transformer call cost a few tens of milliseconds on a two-core CPU, so that skipped work shows up
in wall-clock time above the per-call Python overhead; the ``quick`` scale is for a smoke test.

The same ``(family, scale, seed)`` always gives the same weights and the same call arguments, so two
pipelines built alike compute the same thing: one carries the CacheEngine, the other diffusers' hooks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderKLCogVideoX,
    AutoencoderKLWan,
    CogVideoXDDIMScheduler,
    CogVideoXTransformer3DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxTransformer2DModel,
    WanTransformer3DModel,
)

# Imported from their modules: diffusers' lazy top-level names type-check as placeholder classes.
# The components are passed as a dict for the same reason (and because text encoders are None).
from diffusers.pipelines.cogvideo.pipeline_cogvideox import CogVideoXPipeline
from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
from diffusers.pipelines.pipeline_utils import DiffusionPipeline
from diffusers.pipelines.wan.pipeline_wan import WanPipeline

ScaleName = Literal["bench", "quick"]
CfgMode = Literal["distilled", "batched", "separate"]
TensorFormat = Literal["BCHW", "BCFHW", "BFCHW"]


@dataclass(frozen=True)
class Scale:
    """Sizes shared by every family at one scale."""

    heads: int
    head_dim: int
    layers: int  # transformer blocks (Flux: single-stream blocks; it also has ``layers // 2`` double ones)
    text_len: int
    text_dim: int
    image_size: int  # pixels; the VAEs below compress 8x, Flux then packs 2x2 latent patches
    video_size: int
    video_frames: int  # 4x temporal compression: 4k + 1 frames give k + 1 latent frames


SCALES: dict[ScaleName, Scale] = {
    "bench": Scale(
        heads=4,
        head_dim=32,
        layers=6,
        text_len=32,
        text_dim=64,
        image_size=256,
        video_size=128,
        video_frames=9,
    ),
    "quick": Scale(
        heads=2,
        head_dim=16,
        layers=2,
        text_len=8,
        text_dim=32,
        image_size=64,
        video_size=32,
        video_frames=5,
    ),
}


@dataclass(frozen=True)
class FamilySpec:
    """How one benchmarked family is built and how it runs classifier-free guidance.

    ``tensor_format`` is the layout of the transformer's output, which diffusers' FasterCache needs to
    be told (the engine reads it from its own model table).
    """

    name: str
    cfg: CfgMode
    tensor_format: TensorFormat
    build: Callable[[Scale, torch.Generator], tuple[DiffusionPipeline, dict[str, Any]]]

    @property
    def label(self) -> str:
        return f"{self.name} ({self.cfg} CFG)" if self.cfg != "distilled" else f"{self.name} (distilled)"

    @property
    def calls_per_step(self) -> int:
        return 2 if self.cfg == "separate" else 1


@dataclass
class BenchPipeline:
    """A built pipeline and the arguments that run it (all but ``generator``)."""

    family: FamilySpec
    pipe: DiffusionPipeline
    call_kwargs: dict[str, Any]

    @property
    def transformer(self) -> torch.nn.Module:
        module = getattr(self.pipe, "transformer", None)
        assert isinstance(module, torch.nn.Module)
        return module


def _randn(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=gen, dtype=torch.float32)


def _image_vae() -> AutoencoderKL:
    # Never run (the pipelines return latents); it only tells the pipeline its 8x compression.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(4, 4, 4, 4),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=2,
        shift_factor=0.0,
    )


def _build_flux(scale: Scale, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Flux without true CFG (a guidance-distilled model: one transformer call per step)."""
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,
        num_layers=max(1, scale.layers // 2),
        num_single_layers=scale.layers,
        attention_head_dim=scale.head_dim,
        num_attention_heads=scale.heads,
        joint_attention_dim=scale.text_dim,
        pooled_projection_dim=scale.text_dim,
        guidance_embeds=False,
        # The three rotary axes must add up to the head dimension.
        axes_dims_rope=(scale.head_dim // 4, 3 * scale.head_dim // 8, 3 * scale.head_dim // 8),
    )
    components: dict[str, Any] = {
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "vae": _image_vae(),
        "text_encoder": None,
        "tokenizer": None,
        "text_encoder_2": None,
        "tokenizer_2": None,
        "transformer": transformer,
    }
    pipe = FluxPipeline(**components)
    kwargs: dict[str, Any] = {
        "prompt_embeds": _randn(gen, 1, scale.text_len, scale.text_dim),
        "pooled_prompt_embeds": _randn(gen, 1, scale.text_dim),
        "height": scale.image_size,
        "width": scale.image_size,
        "max_sequence_length": scale.text_len,
    }
    return pipe, kwargs


def _build_cogvideox(scale: Scale, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """CogVideoX with CFG batched: [uncond, cond] in one transformer call of batch 2 per step."""
    transformer = CogVideoXTransformer3DModel(
        num_attention_heads=scale.heads,
        attention_head_dim=scale.head_dim,
        in_channels=4,
        out_channels=4,
        time_embed_dim=scale.heads * scale.head_dim,
        text_embed_dim=scale.text_dim,
        num_layers=scale.layers,
        sample_width=scale.video_size // 8,
        sample_height=scale.video_size // 8,
        sample_frames=scale.video_frames,
        patch_size=2,
        temporal_compression_ratio=4,
        # The sincos position table covers exactly this many text tokens.
        max_text_seq_length=scale.text_len,
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
    # The released CogVideoX-5b scheduler: v-prediction on a zero-terminal-SNR schedule from t=999.
    scheduler = CogVideoXDDIMScheduler(
        prediction_type="v_prediction",
        rescale_betas_zero_snr=True,
        timestep_spacing="trailing",
        snr_shift_scale=1.0,
        clip_sample=False,
    )
    components: dict[str, Any] = {
        "tokenizer": None,
        "text_encoder": None,
        "vae": vae,
        "transformer": transformer,
        "scheduler": scheduler,
    }
    pipe = CogVideoXPipeline(**components)
    kwargs: dict[str, Any] = {
        "prompt_embeds": _randn(gen, 1, scale.text_len, scale.text_dim),
        "negative_prompt_embeds": _randn(gen, 1, scale.text_len, scale.text_dim),
        "guidance_scale": 6.0,
        "height": scale.video_size,
        "width": scale.video_size,
        "num_frames": scale.video_frames,
        "max_sequence_length": scale.text_len,
    }
    return pipe, kwargs


def _build_wan(scale: Scale, gen: torch.Generator) -> tuple[DiffusionPipeline, dict[str, Any]]:
    """Wan 2.1 with CFG as two separate transformer calls per step (cond, then uncond)."""
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=scale.heads,
        attention_head_dim=scale.head_dim,
        in_channels=4,
        out_channels=4,
        text_dim=scale.text_dim,
        freq_dim=scale.heads * scale.head_dim,
        ffn_dim=4 * scale.heads * scale.head_dim,
        num_layers=scale.layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
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
    components: dict[str, Any] = {
        "tokenizer": None,
        "text_encoder": None,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(),
        "transformer": transformer,
    }
    pipe = WanPipeline(**components)
    kwargs: dict[str, Any] = {
        "prompt_embeds": _randn(gen, 1, scale.text_len, scale.text_dim),
        "negative_prompt_embeds": _randn(gen, 1, scale.text_len, scale.text_dim),
        "guidance_scale": 5.0,
        "height": scale.video_size,
        "width": scale.video_size,
        "num_frames": scale.video_frames,
        "max_sequence_length": scale.text_len,
    }
    return pipe, kwargs


FAMILIES: dict[str, FamilySpec] = {
    "flux": FamilySpec("flux", "distilled", "BCHW", _build_flux),
    "cogvideox": FamilySpec("cogvideox", "batched", "BFCHW", _build_cogvideox),
    "wan": FamilySpec("wan", "separate", "BCFHW", _build_wan),
}


def build(family: str, *, scale: ScaleName = "bench", steps: int = 10, seed: int = 0) -> BenchPipeline:
    """Build ``family`` at ``scale`` with seeded weights and prompt embeddings."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    default_dtype = torch.get_default_dtype()
    # fork_rng keeps the caller's global RNG where it was; the embeddings draw from their own
    # generator so they do not depend on how many parameters the modules drew.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        torch.set_default_dtype(torch.float32)
        try:
            pipe, kwargs = spec.build(SCALES[scale], torch.Generator("cpu").manual_seed(seed + 1))
        finally:
            torch.set_default_dtype(default_dtype)
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            component.eval()
    pipe.set_progress_bar_config(disable=True)
    kwargs.update(num_inference_steps=steps, output_type="latent", return_dict=True)
    return BenchPipeline(family=spec, pipe=pipe, call_kwargs=kwargs)


def run(bp: BenchPipeline, *, seed: int = 0) -> torch.Tensor:
    """One generation from seeded initial noise; returns the final latents."""
    # DiffusionPipeline declares no __call__; every concrete pipeline has one.
    pipe: Any = bp.pipe
    output = pipe(**bp.call_kwargs, generator=torch.Generator("cpu").manual_seed(seed))
    latents = output[0]
    assert isinstance(latents, torch.Tensor)
    return latents
