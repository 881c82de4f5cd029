"""The transformer classes from GlmImage to MiniMaxH3, built tiny from diffusers' own test configurations where there is one."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.models.embeddings import get_2d_rotary_pos_embed, get_2d_rotary_pos_embed_lumina
from diffusers.models.transformers.transformer_ideogram4 import (
    IMAGE_POSITION_OFFSET,
    LLM_TOKEN_INDICATOR,
    OUTPUT_IMAGE_INDICATOR,
)
from torch import nn

from tiny_pipelines.transformers import BATCH, TinyTransformer, generator, named_model, randn, timesteps


def _grid_ids(height: int, width: int, offset: int = 0) -> torch.Tensor:
    """(height * width, 3) rotary coordinates (0, row, column) of a latent grid, rows and columns from offset."""
    rows = torch.arange(height).repeat_interleave(width) + offset
    columns = torch.arange(width).repeat(height) + offset
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=1).float()


def _build_glm_image() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "GlmImageTransformer2DModel",
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        text_embed_dim=16,
        time_embed_dim=16,
        condition_dim=8,
        prior_vq_quantizer_codebook_size=64,
    )
    gen = generator()
    # One prior token per latent patch, as the pipeline passes them: (batch, (8 / 2) * (8 / 2)).
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "prior_token_id": torch.randint(0, 64, (BATCH, 16), generator=gen),
        "prior_token_drop": torch.zeros(BATCH, 16, dtype=torch.bool),
        "timestep": timesteps(500.0),
        "target_size": torch.tensor([[64.0, 64.0]] * BATCH),
        "crop_coords": torch.zeros(BATCH, 2),
        "return_dict": False,
    }


def _build_helios() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "HeliosTransformer3DModel",
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_dim=(4, 4, 4),
        has_multi_term_memory_patch=True,
        guidance_cross_attn=True,
        zero_history_timestep=True,
        is_amplify_history=False,
    )
    gen = generator()
    # The pipeline's frame layout: long (4), mid (2) and short (1) history frames, then the 2 noisy frames.
    long, mid, short, noisy = torch.arange(9).split([4, 2, 1, 2])

    def indices(frames: torch.Tensor) -> torch.Tensor:
        return frames.unsqueeze(0).expand(BATCH, -1)

    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "indices_hidden_states": indices(noisy),
        "indices_latents_history_short": indices(short),
        "indices_latents_history_mid": indices(mid),
        "indices_latents_history_long": indices(long),
        "latents_history_short": randn(gen, BATCH, 4, 1, 8, 8),
        "latents_history_mid": randn(gen, BATCH, 4, 2, 8, 8),
        "latents_history_long": randn(gen, BATCH, 4, 4, 8, 8),
        "return_dict": False,
    }


def _build_hidream_image() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "HiDreamImageTransformer2DModel",
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        caption_channels=[8, 4],
        text_emb_dim=8,
        num_routed_experts=4,
        num_activated_experts=2,
        axes_dims_rope=(4, 2, 2),
        max_resolution=(32, 32),
        # One Llama layer per block, double and single stream alike.
        llama_layers=[0, 1, 2, 3],
        force_inference_output=True,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timesteps": timesteps(500.0),
        "encoder_hidden_states_t5": randn(gen, BATCH, 8, 8),
        # (llama layers, batch, tokens, features): the layer axis leads, as the pipeline stacks them.
        "encoder_hidden_states_llama3": randn(gen, 4, BATCH, 8, 4),
        "pooled_embeds": randn(gen, BATCH, 8),
        "return_dict": False,
    }


def _build_hunyuan_dit() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "HunyuanDiT2DModel",
        sample_size=8,
        patch_size=2,
        in_channels=4,
        # Four layers give one long skip: block 3 takes block 0's output.
        num_layers=4,
        attention_head_dim=8,
        num_attention_heads=2,
        cross_attention_dim=8,
        cross_attention_dim_t5=8,
        pooled_projection_dim=4,
        hidden_size=16,
        text_len=4,
        text_len_t5=4,
        activation_fn="gelu-approximate",
    )
    gen = generator()
    # The pipeline's meta sizes: original (1024, 1024), target (64, 64), crop top-left (0, 0).
    meta = torch.tensor([[1024.0, 1024.0, 64.0, 64.0, 0.0, 0.0]] * BATCH)
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 4, 8),
        "text_embedding_mask": torch.ones(BATCH, 4),
        "encoder_hidden_states_t5": randn(gen, BATCH, 4, 8),
        "text_embedding_mask_t5": torch.ones(BATCH, 4),
        "image_meta_size": meta,
        "style": torch.zeros(BATCH, dtype=torch.long),
        # Computed by the pipeline, shared by the batch: (cos, sin) over the 4 x 4 patch grid, its crop region
        # taken in the 32 x 32 patch grid of a 512-pixel base size.
        "image_rotary_emb": get_2d_rotary_pos_embed(8, ((0, 0), (32, 32)), (4, 4)),
        "return_dict": False,
    }


def _build_hunyuan_image() -> tuple[nn.Module, dict[str, Any]]:
    # No `text_embed_2_dim`: its ByT5 projection has a fixed 2048-wide hidden layer (millions of parameters).
    model = named_model(
        "HunyuanImageTransformer2DModel",
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        patch_size=(1, 1),
        text_embed_dim=16,
        rope_axes_dim=(4, 4),
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 4, 4),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "encoder_attention_mask": torch.ones(BATCH, 6),
        "return_dict": False,
    }


def _build_hunyuan_video15() -> tuple[nn.Module, dict[str, Any]]:
    # The ByT5 projection is always built with a fixed 2048-wide hidden layer: about 4.3M of the parameters.
    model = named_model(
        "HunyuanVideo15Transformer3DModel",
        # Latents (4) + image-condition latents (4) + condition mask (1), as the pipeline concatenates them.
        in_channels=9,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        num_refiner_layers=2,
        mlp_ratio=2.0,
        patch_size=1,
        patch_size_t=1,
        text_embed_dim=16,
        text_embed_2_dim=8,
        image_embed_dim=12,
        rope_axes_dim=(2, 2, 4),
        target_size=16,
        task_type="t2v",
    )
    gen = generator()
    latents = randn(gen, BATCH, 4, 2, 4, 4)
    return model, {
        "hidden_states": torch.cat([latents, torch.zeros(BATCH, 5, 2, 4, 4)], dim=1),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "encoder_attention_mask": torch.ones(BATCH, 6),
        "encoder_hidden_states_2": randn(gen, BATCH, 2, 8),
        "encoder_attention_mask_2": torch.ones(BATCH, 2),
        # All zeros: forward's text-to-video branch, as the text-to-video pipeline passes them.
        "image_embeds": torch.zeros(BATCH, 3, 12),
        "return_dict": False,
    }


def _build_hunyuan_video_framepack() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "HunyuanVideoFramepackTransformer3DModel",
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
        has_image_proj=True,
        image_proj_dim=16,
        has_clean_x_embedder=True,
    )
    gen = generator()
    # The pipeline's frame layout: prefix (1), 4x history (4), 2x history (2), 1x history (1), noisy (2).
    prefix, history_4x, history_2x, history_1x, noisy = torch.arange(10).split([1, 4, 2, 1, 2])
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 4, 4),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "encoder_attention_mask": torch.ones(BATCH, 6),
        "pooled_projections": randn(gen, BATCH, 8),
        "image_embeds": randn(gen, BATCH, 4, 16),
        # Frame indices have no batch axis: forward builds a meshgrid from them.
        "indices_latents": noisy,
        "guidance": timesteps(6000.0),
        "latents_clean": randn(gen, BATCH, 4, 2, 4, 4),
        "indices_latents_clean": torch.cat([prefix, history_1x]),
        "latents_history_2x": randn(gen, BATCH, 4, 2, 4, 4),
        "indices_latents_history_2x": history_2x,
        "latents_history_4x": randn(gen, BATCH, 4, 4, 4, 4),
        "indices_latents_history_4x": history_4x,
        "return_dict": False,
    }


def _build_hunyuan_video() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "HunyuanVideoTransformer3DModel",
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=2,
        num_single_layers=2,
        num_refiner_layers=2,
        patch_size=2,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "encoder_attention_mask": torch.ones(BATCH, 6),
        "pooled_projections": randn(gen, BATCH, 8),
        # The pipeline passes guidance_scale * 1000.
        "guidance": timesteps(6000.0),
        "return_dict": False,
    }


def _build_ideogram4() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Ideogram4Transformer2DModel",
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        intermediate_size=32,
        adaln_dim=16,
        llm_features_dim=24,
        rope_theta=10_000,
        mrope_section=(2, 1, 1),
        norm_eps=1e-5,
    )
    gen = generator()
    text, grid = 4, 4
    image = grid * grid
    # One packed sequence per sample: 4 text tokens, then a 4 x 4 grid of image tokens. Latents are zero on the
    # text rows and text features zero on the image rows, as the pipeline packs them.
    hidden_states = torch.cat([torch.zeros(BATCH, text, 16), randn(gen, BATCH, image, 16)], dim=1)
    encoder_hidden_states = torch.cat([randn(gen, BATCH, text, 24), torch.zeros(BATCH, image, 24)], dim=1)
    text_positions = torch.arange(text).unsqueeze(1).expand(text, 3)
    image_positions = _grid_ids(grid, grid).long() + IMAGE_POSITION_OFFSET
    position_ids = torch.cat([text_positions, image_positions]).unsqueeze(0).expand(BATCH, -1, -1)
    indicator = torch.tensor([LLM_TOKEN_INDICATOR] * text + [OUTPUT_IMAGE_INDICATOR] * image)
    return model, {
        "hidden_states": hidden_states,
        # Model time: 0 is noise, 1 is clean data.
        "timestep": timesteps(0.5),
        "encoder_hidden_states": encoder_hidden_states,
        "position_ids": position_ids.contiguous(),
        "segment_ids": torch.ones(BATCH, text + image, dtype=torch.long),
        "indicator": indicator.unsqueeze(0).expand(BATCH, -1).contiguous(),
        "return_dict": False,
    }


_JOYIMAGE_CONFIG: dict[str, Any] = {
    "patch_size": [1, 2, 2],
    "in_channels": 4,
    "hidden_size": 32,
    "num_attention_heads": 2,
    "text_dim": 16,
    "num_layers": 2,
    "rope_dim_list": [4, 6, 6],
    "theta": 256,
}


def _build_joyimage_edit_plus() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model("JoyImageEditPlusTransformer3DModel", **_JOYIMAGE_CONFIG)
    gen = generator()
    # Patches of the target (a 2 x 2 grid of 2 x 2 patches), then of one reference image of the same size.
    return model, {
        "hidden_states": randn(gen, BATCH, 8, 4, 1, 2, 2),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "encoder_hidden_states_mask": torch.ones(BATCH, 6),
        "shape_list": [[(1, 2, 2), (1, 2, 2)] for _ in range(BATCH)],
        "return_dict": False,
    }


def _build_joyimage_edit() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model("JoyImageEditTransformer3DModel", **_JOYIMAGE_CONFIG)
    gen = generator()
    # (batch, items, channels, frames, height, width): a reference image, then the noisy target.
    return model, {
        "hidden_states": randn(gen, BATCH, 2, 4, 1, 4, 4),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "return_dict": False,
    }


def _build_kandinsky5() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Kandinsky5Transformer3DModel",
        in_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        out_visual_dim=4,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=2,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        visual_cond=True,
    )
    # Every modulation projection is zero-initialised, which would make each block an identity and the output
    # independent of the timestep and the text; give them small seeded weights.
    drawn = generator(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "modulation" in name:
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=drawn))
    gen = generator()
    latents = randn(gen, BATCH, 2, 8, 8, 4)
    # Channels-last: latents (4) + condition latents (4) + condition mask (1), zero as in text-to-video.
    return model, {
        "hidden_states": torch.cat([latents, torch.zeros(BATCH, 2, 8, 8, 5)], dim=-1),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "timestep": timesteps(500.0),
        "pooled_projections": randn(gen, BATCH, 8),
        "visual_rope_pos": [torch.arange(2), torch.arange(4), torch.arange(4)],
        "text_rope_pos": torch.arange(6),
        "scale_factor": (1.0, 2.0, 2.0),
        "return_dict": False,
    }


def _build_kandinsky6_sr() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Kandinsky6SRTransformer3DModel",
        in_visual_dim=4,
        out_visual_dim=4,
        time_dim=16,
        patch_size=(1, 1, 1),
        model_dim=32,
        ff_dim=64,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
    )
    gen = generator()
    latents = randn(gen, BATCH, 1, 8, 8, 4)
    # Its NABLA attention needs an 8 x 8 token grid at least. Channels-last: latents, zero anchor, zero mask.
    return model, {
        "hidden_states": torch.cat([latents, torch.zeros(BATCH, 1, 8, 8, 5)], dim=-1),
        "timestep": timesteps(500.0),
        "return_dict": False,
    }


def _build_kandinsky6() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Kandinsky6Transformer3DModel",
        in_visual_dim=4,
        out_visual_dim=4,
        in_text_dim=16,
        in_text_dim2=8,
        time_dim=16,
        patch_size=(1, 2, 2),
        model_dim=32,
        ff_dim=64,
        num_text_blocks=2,
        num_visual_blocks=2,
        axes_dims=(4, 6, 6),
        visual_cond=True,
        in_audio_dim=4,
        out_audio_dim=4,
        # As in the released checkpoints.
        text_token_padding=True,
        ca_rope=True,
        cross_gates=True,
        fix_modulation=True,
    )
    gen = generator()
    latents = randn(gen, BATCH, 2, 8, 8, 4)
    return model, {
        "hidden_states": torch.cat([latents, torch.zeros(BATCH, 2, 8, 8, 5)], dim=-1),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "pooled_projections": randn(gen, BATCH, 8),
        "timestep": timesteps(500.0),
        "audio_hidden_states": randn(gen, BATCH, 5, 4),
        "return_dict": False,
    }


def _build_krea2() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Krea2Transformer2DModel",
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=32,
        timestep_embed_dim=8,
        text_hidden_dim=16,
        num_text_layers=3,
        text_num_attention_heads=2,
        text_num_key_value_heads=1,
        text_intermediate_size=16,
        num_layerwise_text_blocks=2,
        num_refiner_text_blocks=2,
        axes_dims_rope=(4, 2, 2),
        rope_theta=1000.0,
        norm_eps=1e-5,
    )
    gen = generator()
    text, grid = 4, 4
    # The last text token is padding, to take the key-padding mask path.
    mask = torch.ones(BATCH, text, dtype=torch.bool)
    mask[:, -1] = False
    return model, {
        "hidden_states": randn(gen, BATCH, grid * grid, 16),
        "encoder_hidden_states": randn(gen, BATCH, text, 3, 16),
        "timestep": timesteps(0.5),
        # Text rows all zero, then the image grid; no batch axis.
        "position_ids": torch.cat([torch.zeros(text, 3), _grid_ids(grid, grid)]),
        "encoder_attention_mask": mask,
        "return_dict": False,
    }


def _build_ltx2_video() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "LTX2VideoTransformer3DModel",
        in_channels=4,
        out_channels=4,
        patch_size=1,
        patch_size_t=1,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        audio_in_channels=4,
        audio_out_channels=4,
        audio_num_attention_heads=2,
        audio_attention_head_dim=4,
        audio_cross_attention_dim=8,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
        rope_double_precision=False,
    )
    gen = generator()
    frames, height, width, audio_frames = 2, 4, 4, 5
    return model, {
        "hidden_states": randn(gen, BATCH, frames * height * width, 4),
        "audio_hidden_states": randn(gen, BATCH, audio_frames, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "audio_encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "timestep": timesteps(500.0),
        "sigma": timesteps(500.0),
        "encoder_attention_mask": torch.ones(BATCH, 6, dtype=torch.bool),
        "audio_encoder_attention_mask": torch.ones(BATCH, 6, dtype=torch.bool),
        "num_frames": frames,
        "height": height,
        "width": width,
        "fps": 25.0,
        "audio_num_frames": audio_frames,
        "return_dict": False,
    }


def _build_ltx_video() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "LTXVideoTransformer3DModel",
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=2,
        qk_norm="rms_norm_across_heads",
        caption_channels=16,
    )
    gen = generator()
    frames, height, width = 2, 4, 4
    return model, {
        "hidden_states": randn(gen, BATCH, frames * height * width, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "timestep": timesteps(500.0),
        "encoder_attention_mask": torch.ones(BATCH, 6, dtype=torch.bool),
        "num_frames": frames,
        "height": height,
        "width": width,
        # The pipeline's (temporal compression / frame rate, spatial compression, spatial compression).
        "rope_interpolation_scale": (8 / 25, 32.0, 32.0),
        "return_dict": False,
    }


def _build_latte() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "LatteTransformer3DModel",
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_channels=8,
        in_channels=4,
        # Cross-attention reads the caption projection, which has the inner width (2 heads x 8).
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        # The temporal positional embedding is added only when the frame count equals it.
        video_length=2,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "enable_temporal_attentions": True,
        "return_dict": False,
    }


def _build_longcat_image() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "LongCatImageTransformer2DModel",
        patch_size=1,
        # 4 latent channels packed 2 x 2, as the pipeline packs them.
        in_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    gen = generator()
    text, grid = 6, 4
    text_ids = torch.zeros(text, 3)
    text_ids[:, 1] = text_ids[:, 2] = torch.arange(text).float()
    image_ids = _grid_ids(grid, grid, offset=text)
    image_ids[:, 0] = 1.0
    return model, {
        "hidden_states": randn(gen, BATCH, grid * grid, 16),
        "encoder_hidden_states": randn(gen, BATCH, text, 32),
        # The pipeline passes t / 1000; forward multiplies it back by 1000.
        "timestep": timesteps(0.5),
        "img_ids": image_ids,
        "txt_ids": text_ids,
        "return_dict": False,
    }


def _build_lumina2() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Lumina2Transformer2DModel",
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=2,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=2,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        scaling_factor=1.0,
        axes_dim_rope=(4, 2, 2),
        axes_lens=(128, 128, 128),
        cap_feat_dim=32,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        # Model time: 0 is noise, 1 is clean data (the pipeline passes 1 - t / 1000).
        "timestep": timesteps(0.5),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "encoder_attention_mask": torch.ones(BATCH, 6, dtype=torch.bool),
        "return_dict": False,
    }


def _build_lumina_next() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "LuminaNextDiT2DModel",
        sample_size=16,
        patch_size=2,
        in_channels=4,
        hidden_size=24,
        num_layers=2,
        num_attention_heads=3,
        num_kv_heads=1,
        multiple_of=16,
        ffn_dim_multiplier=None,
        norm_eps=1e-5,
        learn_sigma=True,
        qk_norm=True,
        cross_attention_dim=32,
        scaling_factor=1.0,
    )
    # `pad_token` is allocated with torch.empty and never read: make it deterministic all the same.
    model.get_parameter("pad_token").data.zero_()
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        # Model time: 0 is noise, 1 is clean data (the pipeline passes 1 - t / 1000).
        "timestep": timesteps(0.5),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "encoder_mask": torch.ones(BATCH, 6),
        # The pipeline passes a 384 x 384 table (head_dim 8 here); forward slices its top-left patch grid.
        "image_rotary_emb": get_2d_rotary_pos_embed_lumina(8, 32, 32),
        "cross_attention_kwargs": {},
        "return_dict": False,
    }


def _build_minimax_h3() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "MiniMaxH3Transformer3DModel",
        num_attention_heads=2,
        attention_head_dim=16,
        hidden_size=24,
        num_layers=2,
        num_refiner_layers=2,
        ffn_dim=32,
        in_channels=4,
        audio_in_channels=6,
        patch_size=(1, 2, 2),
        text_dim=8,
        freq_dim=8,
        time_embed_hidden_dim=24,
        time_embed_dim=16,
        rope_freq_dim=2,
    )
    gen = generator()
    text, audio, video = 4, 6, 8
    length = text + audio + video
    text_indices = torch.arange(text)
    audio_indices = torch.arange(text, text + audio)
    video_indices = torch.arange(text + audio, length)
    # One packed sequence, shared by the batch: text, audio, then video rows; 0 = video, 1 = text, 2 = audio.
    token_tags = torch.zeros(length, dtype=torch.long)
    token_tags[text_indices] = 1
    token_tags[audio_indices] = 2
    # `timestep` holds the distinct noise levels of the sequence (not one per sample): the audio rows take the second.
    timestep_indices = torch.zeros(length, dtype=torch.long)
    timestep_indices[audio_indices] = 1
    position_ids = torch.zeros(length, 3)
    position_ids[:, 0] = torch.arange(length).float()
    position_ids[video_indices, 1] = (torch.arange(video) // 2).float()
    position_ids[video_indices, 2] = (torch.arange(video) % 2).float()
    return model, {
        "hidden_states": randn(gen, BATCH, video, 16),
        "audio_hidden_states": randn(gen, BATCH, audio, 6),
        "encoder_hidden_states": randn(gen, BATCH, text, 8),
        # Model time: 0 is noise, 1 is clean data.
        "timestep": torch.tensor([0.5, 0.45]),
        "timestep_indices": timestep_indices,
        "token_tags": token_tags,
        "position_ids": position_ids,
        "video_indices": video_indices,
        "audio_indices": audio_indices,
        "text_indices": text_indices,
        "return_dict": False,
    }


TRANSFORMERS: tuple[TinyTransformer, ...] = (
    TinyTransformer("GlmImageTransformer2DModel", _build_glm_image, "hidden_states", "timestep"),
    TinyTransformer("HeliosTransformer3DModel", _build_helios, "hidden_states", "timestep"),
    TinyTransformer("HiDreamImageTransformer2DModel", _build_hidream_image, "hidden_states", "timesteps"),
    TinyTransformer("HunyuanDiT2DModel", _build_hunyuan_dit, "hidden_states", "timestep"),
    TinyTransformer("HunyuanImageTransformer2DModel", _build_hunyuan_image, "hidden_states", "timestep"),
    TinyTransformer("HunyuanVideo15Transformer3DModel", _build_hunyuan_video15, "hidden_states", "timestep"),
    TinyTransformer(
        "HunyuanVideoFramepackTransformer3DModel", _build_hunyuan_video_framepack, "hidden_states", "timestep"
    ),
    TinyTransformer("HunyuanVideoTransformer3DModel", _build_hunyuan_video, "hidden_states", "timestep"),
    # The pipeline passes 1 - t / 1000: model time runs from 0 (noise) up to 1.
    TinyTransformer(
        "Ideogram4Transformer2DModel",
        _build_ideogram4,
        "hidden_states",
        "timestep",
        timestep_start=0.0,
        timestep_end=1.0,
    ),
    TinyTransformer(
        "JoyImageEditPlusTransformer3DModel", _build_joyimage_edit_plus, "hidden_states", "timestep"
    ),
    TinyTransformer("JoyImageEditTransformer3DModel", _build_joyimage_edit, "hidden_states", "timestep"),
    TinyTransformer("Kandinsky5Transformer3DModel", _build_kandinsky5, "hidden_states", "timestep"),
    TinyTransformer("Kandinsky6SRTransformer3DModel", _build_kandinsky6_sr, "hidden_states", "timestep"),
    TinyTransformer("Kandinsky6Transformer3DModel", _build_kandinsky6, "hidden_states", "timestep"),
    TinyTransformer("Krea2Transformer2DModel", _build_krea2, "hidden_states", "timestep", timestep_start=1.0),
    TinyTransformer("LTX2VideoTransformer3DModel", _build_ltx2_video, "hidden_states", "timestep"),
    TinyTransformer("LTXVideoTransformer3DModel", _build_ltx_video, "hidden_states", "timestep"),
    TinyTransformer("LatteTransformer3DModel", _build_latte, "hidden_states", "timestep"),
    TinyTransformer(
        "LongCatImageTransformer2DModel",
        _build_longcat_image,
        "hidden_states",
        "timestep",
        timestep_start=1.0,
    ),
    TinyTransformer(
        "Lumina2Transformer2DModel",
        _build_lumina2,
        "hidden_states",
        "timestep",
        timestep_start=0.0,
        timestep_end=1.0,
    ),
    TinyTransformer(
        "LuminaNextDiT2DModel",
        _build_lumina_next,
        "hidden_states",
        "timestep",
        timestep_start=0.0,
        timestep_end=1.0,
    ),
    TinyTransformer(
        "MiniMaxH3Transformer3DModel",
        _build_minimax_h3,
        "hidden_states",
        "timestep",
        timestep_start=0.0,
        timestep_end=1.0,
    ),
)
