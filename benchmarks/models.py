"""Seeded random-weight pipelines for the engine benchmark, large enough for timing to mean something.

Each family is a pipeline of the tiny-pipeline factory (``tiny_pipelines``: the genuine diffusers
pipeline and transformer classes, random weights, nothing downloaded) with its transformer resized to
a scale, built without text encoders (prompt embeddings are passed directly) and run with
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
from diffusers.pipelines.pipeline_utils import DiffusionPipeline

from tiny_pipelines import Recipe, tiny_pipeline
from tiny_pipelines.wan import RECIPE as WAN_RECIPE

ScaleName = Literal["bench", "quick"]
CfgMode = Literal["distilled", "batched", "separate"]
TensorFormat = Literal["BCHW", "BCFHW", "BFCHW"]

# Latent channels of every benchmarked VAE (the factory's have 8): the transformers' input widths
# stay those the recorded results were measured with.
LATENT_CHANNELS = 4


@dataclass(frozen=True)
class Scale:
    """Sizes shared by every family at one scale."""

    heads: int
    head_dim: int
    layers: int  # transformer blocks (Flux: single-stream blocks; it also has ``layers // 2`` double ones)
    text_len: int
    text_dim: int
    image_size: int  # pixels; Flux's VAE compresses 4x, then 2x2 latent patches make one token
    video_size: int  # pixels; the video VAEs compress 8x, then 2x2 patches make one token
    video_frames: int  # 4x temporal compression: 4k + 1 frames give k + 1 latent frames


SCALES: dict[ScaleName, Scale] = {
    "bench": Scale(
        heads=4,
        head_dim=32,
        layers=6,
        text_len=32,
        text_dim=64,
        image_size=128,
        video_size=128,
        video_frames=9,
    ),
    "quick": Scale(
        heads=2,
        head_dim=16,
        layers=2,
        text_len=8,
        text_dim=32,
        image_size=32,
        video_size=32,
        video_frames=5,
    ),
}


@dataclass(frozen=True)
class FamilySpec:
    """How one benchmarked family is built and how it runs classifier-free guidance.

    ``tiny`` names the factory's pipeline, ``overrides`` resizes it to a scale and ``inputs`` gives
    the call's prompt embeddings, guidance and size. ``tensor_format`` is the layout of the
    transformer's output, which diffusers' FasterCache needs to be told (the engine reads it from its
    own model table).
    """

    name: str
    cfg: CfgMode
    tensor_format: TensorFormat
    tiny: str
    overrides: Callable[[Scale], Recipe]
    inputs: Callable[[Scale, torch.Generator], dict[str, Any]]

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


def _text(scale: Scale, gen: torch.Generator) -> torch.Tensor:
    return torch.randn(1, scale.text_len, scale.text_dim, generator=gen)


def _flux(scale: Scale) -> Recipe:
    """Flux without true CFG (a guidance-distilled model: one transformer call per step)."""
    return {
        "transformer": {
            "in_channels": 4 * LATENT_CHANNELS,  # 2x2 latent patches packed into one token
            "num_layers": max(1, scale.layers // 2),
            "num_single_layers": scale.layers,
            "attention_head_dim": scale.head_dim,
            "num_attention_heads": scale.heads,
            "joint_attention_dim": scale.text_dim,
            "pooled_projection_dim": scale.text_dim,
            # The three rotary axes must add up to the head dimension.
            "axes_dims_rope": (scale.head_dim // 4, 3 * scale.head_dim // 8, 3 * scale.head_dim // 8),
        },
        "vae": {"latent_channels": LATENT_CHANNELS},
    }


def _flux_inputs(scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    return {
        "prompt_embeds": _text(scale, gen),
        "pooled_prompt_embeds": torch.randn(1, scale.text_dim, generator=gen),
        "height": scale.image_size,
        "width": scale.image_size,
        "max_sequence_length": scale.text_len,
    }


def _cogvideox(scale: Scale) -> Recipe:
    """CogVideoX with CFG batched: [uncond, cond] in one transformer call of batch 2 per step."""
    return {
        "transformer": {
            "num_attention_heads": scale.heads,
            "attention_head_dim": scale.head_dim,
            "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS,
            "time_embed_dim": scale.heads * scale.head_dim,
            "text_embed_dim": scale.text_dim,
            "num_layers": scale.layers,
            "sample_width": scale.video_size // 8,
            "sample_height": scale.video_size // 8,
            "sample_frames": scale.video_frames,
            # Sincos positions (CogVideoX-2b), as measured; their table covers exactly this many text
            # tokens.
            "use_rotary_positional_embeddings": False,
            "max_text_seq_length": scale.text_len,
        },
        "vae": {"latent_channels": LATENT_CHANNELS},
    }


def _cogvideox_inputs(scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    return {
        "prompt_embeds": _text(scale, gen),
        "negative_prompt_embeds": _text(scale, gen),
        "guidance_scale": 6.0,
        "height": scale.video_size,
        "width": scale.video_size,
        "num_frames": scale.video_frames,
        "max_sequence_length": scale.text_len,
    }


def _wan(scale: Scale) -> Recipe:
    """Wan 2.1 with CFG as two separate transformer calls per step (cond, then uncond)."""
    vae = WAN_RECIPE["vae"]
    return {
        "transformer": {
            "num_attention_heads": scale.heads,
            "attention_head_dim": scale.head_dim,
            "in_channels": LATENT_CHANNELS,
            "out_channels": LATENT_CHANNELS,
            "text_dim": scale.text_dim,
            "freq_dim": scale.heads * scale.head_dim,
            "ffn_dim": 4 * scale.heads * scale.head_dim,
            "num_layers": scale.layers,
            "rope_max_seq_len": 64,
        },
        "vae": {
            "z_dim": LATENT_CHANNELS,
            "latents_mean": vae["latents_mean"][:LATENT_CHANNELS],
            "latents_std": vae["latents_std"][:LATENT_CHANNELS],
        },
    }


def _wan_inputs(scale: Scale, gen: torch.Generator) -> dict[str, Any]:
    return {**_cogvideox_inputs(scale, gen), "guidance_scale": 5.0}


FAMILIES: dict[str, FamilySpec] = {
    "flux": FamilySpec("flux", "distilled", "BCHW", "flux", _flux, _flux_inputs),
    "cogvideox": FamilySpec("cogvideox", "batched", "BFCHW", "cogvideox", _cogvideox, _cogvideox_inputs),
    "wan": FamilySpec("wan", "separate", "BCFHW", "wan", _wan, _wan_inputs),
}


def build(family: str, *, scale: ScaleName = "bench", steps: int = 10, seed: int = 0) -> BenchPipeline:
    """Build ``family`` at ``scale`` with seeded weights and prompt embeddings."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    sizes = SCALES[scale]
    pipe = tiny_pipeline(spec.tiny).build(seed, overrides=spec.overrides(sizes), text_encoders=False)
    pipe.set_progress_bar_config(disable=True)
    # The embeddings draw from a generator of their own, so they do not depend on the weights.
    kwargs = spec.inputs(sizes, torch.Generator("cpu").manual_seed(seed + 1))
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
