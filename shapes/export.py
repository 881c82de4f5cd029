"""The trained model as a FluxPipeline, and writing it to its folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from shapes import text
from shapes.denoiser import Denoiser
from tiny_pipelines.flux import FLOW_MATCH_SCHEDULER
from tiny_pipelines.folders import write_folder_atomically

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline


def build_pipeline(model: Denoiser, vae: AutoencoderKL) -> FluxPipeline:
    """The pipeline the server loads, with FLUX.1-dev's schedule (for 64 tokens its dynamic shift
    comes to about 1.6)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_MATCH_SCHEDULER),
        vae=vae,
        text_encoder=model.text_encoder,
        tokenizer=text.clip_tokenizer(),
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=text.t5_tokenizer(),
        transformer=model.transformer,
    )


def save_atomically(pipe: FluxPipeline, out: Path) -> None:
    """``save_pretrained`` beside ``out``, swapped in, so ``out`` is always a complete pipeline or absent."""
    write_folder_atomically(out, pipe.save_pretrained, replace=True)
