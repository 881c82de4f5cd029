"""The model the transformer stage trains: the Flux transformer and both text encoders, called as
FluxPipeline calls them, with the caption probe beside them."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from shapes import dataset, text
from shapes.probe import CAPTION_CLASSES, CaptionProbe
from shapes.vae import LATENT_CHANNELS, LATENT_SIDE

if TYPE_CHECKING:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

# The tiny Flux recipe's transformer (tiny_pipelines.flux) has 2 heads; this one has 4, because it is
# trained rather than drawn at random, and the shipped checkpoint's weights have this shape.
TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": 4 * LATENT_CHANNELS,  # Flux packs 2x2 latent patches into one token
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 4,
    "joint_attention_dim": text.HIDDEN,
    "pooled_projection_dim": text.HIDDEN,
    "guidance_embeds": False,
    "axes_dims_rope": (8, 12, 12),
}


def new_transformer(seed: int) -> FluxTransformer2DModel:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


def token_ids(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids exactly as FluxPipeline makes them, both 16 long.

    The pipeline pads CLIP to 77, but CLIP's attention is causal and the pipeline pools at the first
    end-of-text token, so padding to 16 gives the same embedding for a fifth of the work.
    """
    clip = text.clip_tokenizer()
    t5 = text.t5_tokenizer()
    kwargs: dict[str, Any] = {
        "padding": "max_length",
        "max_length": text.T5_LENGTH,
        "truncation": True,
        "return_tensors": "pt",
    }
    return clip(list(captions), **kwargs).input_ids, t5(list(captions), **kwargs).input_ids


class Denoiser(torch.nn.Module):
    """The transformer and both text encoders, called as FluxPipeline calls them.

    ``caption_probe`` classifies the caption's attributes from the pooled CLIP embedding. It is used
    only in training (the pipeline never sees it): its loss makes every attribute point apart in the
    vector that conditions every block, from the first few hundred steps.
    """

    def __init__(self, seed: int) -> None:
        super().__init__()
        self.transformer = new_transformer(seed)
        torch.manual_seed(seed + 1)
        self.text_encoder = text.clip_encoder(text.clip_tokenizer())
        self.text_encoder_2 = text.t5_encoder(text.t5_tokenizer())
        self.caption_probe = CaptionProbe(text.HIDDEN, sum(CAPTION_CLASSES))
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        self.register_buffer(
            "img_ids",
            FluxPipeline._prepare_latent_image_ids(
                1, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32
            ),
        )
        self.register_buffer("txt_ids", torch.zeros(text.T5_LENGTH, 3))

    def forward(
        self, x: torch.Tensor, s: torch.Tensor, clip_ids: torch.Tensor, t5_ids: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed velocity and the caption probe's logits."""
        from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

        pooled = self.text_encoder(clip_ids).pooler_output
        prompt = self.text_encoder_2(t5_ids).last_hidden_state
        n = x.shape[0]
        packed = FluxPipeline._pack_latents(x, n, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
        out: torch.Tensor = self.transformer(
            hidden_states=packed,
            timestep=s,
            pooled_projections=pooled,
            encoder_hidden_states=prompt,
            txt_ids=self.txt_ids,
            img_ids=self.img_ids,
            return_dict=False,
        )[0]
        return out, self.caption_probe(pooled)


def clean_estimate(noisy: torch.Tensor, s: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The clean latent (n, 8, 16, 16) a packed velocity implies: x0 = x_s - s v."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    # _unpack_latents takes the image's size and the VAE's factor.
    unpacked = FluxPipeline._unpack_latents(velocity, dataset.SIZE, dataset.SIZE, 4)
    return noisy - s.view(-1, 1, 1, 1) * unpacked
