"""The transformer classes from Allegro to Flux, built tiny from diffusers' own test configurations where there is one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tiny_pipelines.transformers import BATCH, TinyTransformer, generator, named_model, randn, timesteps


def _build_allegro() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "AllegroTransformer3DModel",
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        cross_attention_dim=16,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        caption_channels=8,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 4, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "timestep": timesteps(500.0),
        "return_dict": False,
    }


_ANYFLOW_CONFIG: dict[str, Any] = {
    "patch_size": (1, 2, 2),
    "num_attention_heads": 2,
    "attention_head_dim": 12,
    "in_channels": 4,
    "out_channels": 4,
    "text_dim": 16,
    "freq_dim": 32,
    "ffn_dim": 32,
    "num_layers": 2,
    "cross_attn_norm": True,
    "rope_max_seq_len": 32,
}


def _build_anyflow() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model("AnyFlowTransformer3DModel", **_ANYFLOW_CONFIG)
    gen = generator()
    # Latents are (batch, frames, channels, height, width); both timesteps are per frame.
    return model, {
        "hidden_states": randn(gen, BATCH, 2, 4, 8, 8),
        "timestep": timesteps(500.0, 2),
        "r_timestep": timesteps(250.0, 2),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "return_dict": False,
    }


def _build_anyflow_far() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "AnyFlowFARTransformer3DModel", compressed_patch_size=(1, 4, 4), full_chunk_limit=3, **_ANYFLOW_CONFIG
    )
    gen = generator()
    # The pipeline's denoising call for the second of two one-frame chunks: the latents hold that chunk only and
    # the self-attention reads the first chunk's keys and values from the KV cache (16 tokens, seeded here), which
    # this call reads but does not write. Cache tensors are (key/value, batch, heads, tokens, head_dim).
    full_cache = torch.zeros(2, BATCH, 2, 3 * 16, 12)
    full_cache[:, :, :, :16] = randn(gen, 2, BATCH, 2, 16, 12)
    kv_cache = {
        layer: {"full_cache": full_cache.clone(), "compressed_cache": torch.zeros(2, BATCH, 2, 0, 12)}
        for layer in range(2)
    }
    return model, {
        "hidden_states": randn(gen, BATCH, 1, 4, 8, 8),
        "timestep": timesteps(500.0, 1),
        "r_timestep": timesteps(250.0, 1),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "chunk_partition": [1, 1],
        "kv_cache": kv_cache,
        "kv_cache_flag": {"num_cached_chunks": 1, "is_cache_step": False},
        "return_dict": False,
    }


def _build_aura_flow() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "AuraFlowTransformer2DModel",
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_mmdit_layers=2,
        num_single_dit_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        # The joint blocks' added K/V projections take the projected caption, so it must be heads * head_dim.
        caption_projection_dim=16,
        joint_attention_dim=32,
        out_channels=4,
        pos_embed_max_size=16,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "timestep": timesteps(0.5),
        "return_dict": False,
    }


def _flux_ids(text_len: int, height: int, width: int, axes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ids shared by the batch: text tokens at the origin, image tokens on their grid (Flux: ``(0, h,
    w)``; Flux 2 and 3: ``(t=0, h, w, l=0)`` for the image and ``l`` counting the text tokens)."""
    rows, cols = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    grid = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()
    zeros = torch.zeros(height * width, 1)
    if axes == 3:
        return torch.zeros(text_len, 3), torch.cat([zeros, grid], dim=-1)
    text = torch.cat([torch.zeros(text_len, 3), torch.arange(text_len).float()[:, None]], dim=-1)
    return text, torch.cat([zeros, grid, zeros], dim=-1)


def _build_bria() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "BriaTransformer2DModel",
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=None,
        axes_dims_rope=[0, 4, 4],
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4)
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "timestep": timesteps(500.0),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "return_dict": False,
    }


def _build_bria_fibo() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "BriaFiboTransformer2DModel",
        patch_size=1,
        in_channels=8,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=32,
        text_encoder_dim=16,
        pooled_projection_dim=None,
        axes_dims_rope=[0, 4, 4],
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4)
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        # One text encoder layer per block, joint blocks first: each replaces half of the text stream's channels.
        "text_encoder_layers": [randn(gen, BATCH, 6, 16) for _ in range(4)],
        "timestep": timesteps(500.0),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "return_dict": False,
    }


def _build_bria_fibo2() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "BriaFibo2Transformer2DModel",
        in_channels=4,
        patch_size=2,
        # The feed-forward width is (dim * 8 // 3) rounded down to a multiple of 64: dim 32 gives 64, below 24 none.
        dim=32,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=2,
        cap_feat_dim=16,
        injection_layer_ids=(1,),
        perceiver_num_layers=2,
        min_num_gist_tokens=4,
        max_num_gist_tokens=4,
        gist_step=4,
        gist_min_text_len=4,
        gist_max_text_len=8,
        axes_dims=(4, 6, 6),
        axes_lens=(16, 8, 8),
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(0.5),
        # The Perceiver's bundle, then one bundle per injection block.
        "encoder_hidden_states": randn(gen, BATCH, 2, 6, 16),
        "return_dict": False,
    }


def _build_chroma() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "ChromaTransformer2DModel",
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        axes_dims_rope=[4, 4, 8],
        approximator_num_channels=8,
        approximator_hidden_dim=16,
        approximator_layers=2,
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4)
    # As the pipeline builds it: a float mask over text then image tokens, the second prompt padded by two.
    attention_mask = torch.ones(BATCH, 6 + 16)
    attention_mask[1, 4:6] = 0.0
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "timestep": timesteps(0.5),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "attention_mask": attention_mask,
        "return_dict": False,
    }


def _build_chronoedit() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "ChronoEditTransformer3DModel",
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=32,
        freq_dim=16,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=64,
        rope_temporal_skip_len=8,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "return_dict": False,
    }


def _build_cogvideox() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "CogVideoXTransformer3DModel",
        # heads * head_dim must be divisible by 16 for the 3D positional embeddings.
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=6,
    )
    gen = generator()
    # Latents are (batch, frames, channels, height, width).
    return model, {
        "hidden_states": randn(gen, BATCH, 2, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "timestep": timesteps(500.0),
        "return_dict": False,
    }


def _size_conditions() -> dict[str, torch.Tensor]:
    return {
        "original_size": torch.tensor([[64.0, 64.0]] * BATCH),
        "target_size": torch.tensor([[64.0, 64.0]] * BATCH),
        "crop_coords": torch.zeros(BATCH, 2),
    }


def _build_cogview3plus() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "CogView3PlusTransformer2DModel",
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=2,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=2,
        pos_embed_max_size=8,
        sample_size=8,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "timestep": timesteps(500.0),
        **_size_conditions(),
        "return_dict": False,
    }


def _build_cogview4() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "CogView4Transformer2DModel",
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=4,
        num_attention_heads=4,
        out_channels=4,
        text_embed_dim=8,
        time_embed_dim=8,
        condition_dim=4,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "timestep": timesteps(500.0),
        **_size_conditions(),
        "return_dict": False,
    }


def _build_consisid() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "ConsisIDTransformer3DModel",
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        time_embed_dim=8,
        text_embed_dim=8,
        num_layers=2,
        sample_width=8,
        sample_height=8,
        sample_frames=8,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=6,
        cross_attn_interval=1,
        is_kps=False,
        is_train_face=True,
        cross_attn_dim_head=4,
        cross_attn_num_heads=2,
        LFE_id_dim=4,
        LFE_vit_dim=4,
        LFE_depth=2,
        LFE_dim_head=8,
        LFE_num_heads=2,
        LFE_num_id_token=1,
        LFE_num_querie=1,
        # The face cross-attention reads int(inner_dim * 2 / 3) channels.
        LFE_output_dim=10,
        LFE_ff_mult=1,
        LFE_num_scale=1,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 1, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 6, 8),
        "timestep": timesteps(500.0),
        "id_cond": randn(gen, BATCH, 4),
        "id_vit_hidden": [randn(gen, BATCH, 3, 4)],
        "return_dict": False,
    }


def _build_cosmos3_omni() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Cosmos3OmniTransformer",
        head_dim=6,
        hidden_act="relu2",
        hidden_size=12,
        intermediate_size=24,
        latent_channel=4,
        latent_patch_size=2,
        num_attention_heads=2,
        num_hidden_layers=2,
        num_key_value_heads=1,
        patch_latent_dim=16,
        qk_norm_for_text=False,
        rope_axes_dim=[1, 1, 1],
        rope_theta=1e4,
        vocab_size=32,
    )
    gen = generator()
    # One packed sequence without a batch dimension, as the pipeline calls it once per guidance pass: four
    # causal text tokens, then the 2x2 patch grid of one 4x4 frame.
    text_len, grid = 4, 2
    vision_len = grid * grid
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    text_positions = torch.arange(text_len)[None].expand(3, -1)
    vision_positions = torch.stack(
        [torch.zeros(vision_len, dtype=torch.long), rows.flatten(), cols.flatten()]
    )
    vision_indexes = torch.arange(text_len, text_len + vision_len)
    return model, {
        "input_ids": torch.randint(0, 32, (text_len,), generator=gen),
        "text_indexes": torch.arange(text_len),
        "position_ids": torch.cat([text_positions, vision_positions + text_len], dim=1),
        "und_len": text_len,
        "sequence_length": text_len + vision_len,
        "vision_tokens": [randn(gen, 1, 4, 1, 4, 4)],
        "vision_token_shapes": [(1, grid, grid)],
        "vision_sequence_indexes": vision_indexes,
        "vision_mse_loss_indexes": vision_indexes,
        "vision_timesteps": torch.full((vision_len,), 500.0),
        "vision_noisy_frame_indexes": [torch.tensor([0])],
        "return_dict": False,
    }


def _build_cosmos() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "CosmosTransformer3DModel",
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        mlp_ratio=2,
        text_embed_dim=16,
        adaln_lora_dim=4,
        max_size=(4, 32, 32),
        patch_size=(1, 2, 2),
        rope_scale=(2.0, 1.0, 1.0),
        # The padding-mask channel is resized with torchvision, which this environment does not install.
        concat_padding_mask=False,
        extra_pos_embed_type="learnable",
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 1, 8, 8),
        "timestep": timesteps(0.5),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "fps": 30,
        "return_dict": False,
    }


def _build_dit() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "DiTTransformer2DModel",
        in_channels=4,
        out_channels=8,
        activation_fn="gelu-approximate",
        num_attention_heads=2,
        attention_head_dim=8,
        attention_bias=True,
        num_layers=2,
        norm_type="ada_norm_zero",
        num_embeds_ada_norm=8,
        patch_size=2,
        sample_size=8,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(500.0),
        "class_labels": torch.tensor([1, 3]),
        "return_dict": False,
    }


def _build_easyanimate() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "EasyAnimateTransformer3DModel",
        # The 3D RoPE gives a quarter and three eighths of each head to its axes: each must come out even.
        attention_head_dim=16,
        num_attention_heads=2,
        in_channels=4,
        mmdit_layers=2,
        num_layers=2,
        out_channels=4,
        patch_size=2,
        sample_height=60,
        sample_width=90,
        text_embed_dim=16,
        time_embed_dim=8,
        time_position_encoding_type="3d_rope",
        timestep_activation_fn="silu",
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "timestep": timesteps(500.0),
        "encoder_hidden_states": randn(gen, BATCH, 6, 16),
        "return_dict": False,
    }


def _build_ernie_image() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "ErnieImageTransformer2DModel",
        hidden_size=16,
        num_attention_heads=2,
        num_layers=2,
        ffn_hidden_size=32,
        in_channels=4,
        out_channels=4,
        patch_size=1,
        text_in_dim=8,
        rope_theta=256,
        rope_axes_dim=(4, 2, 2),
        qk_layernorm=True,
    )
    # The shared modulation and the output projection start at zero, which would make every block an identity
    # and the output zero: give them seeded weights.
    drawn = generator(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("adaLN_modulation.", "final_linear.")):
                param.copy_(0.2 * torch.randn(param.shape, generator=drawn))
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 4, 4),
        "timestep": timesteps(500.0),
        "text_bth": randn(gen, BATCH, 6, 8),
        # The second prompt is padded: its last two text tokens are masked out.
        "text_lens": torch.tensor([6, 4]),
        "return_dict": False,
    }


def _build_flux2() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Flux2Transformer2DModel",
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_guidance_channels=32,
        axes_dims_rope=[4, 4, 4, 4],
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4, axes=4)
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "timestep": timesteps(0.5),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "guidance": timesteps(4.0),
        "return_dict": False,
    }


def _build_flux3() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "Flux3Transformer2DModel",
        in_channels=4,
        cond_in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        timestep_channels=32,
        axes_dims_rope=(4, 4, 4, 4),
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4, axes=4)
    # A reference image (on the next t plane) runs the image_cond per-mode blocks too.
    cond_ids = img_ids.clone()
    cond_ids[:, 0] = 1.0
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "timestep": timesteps(0.5),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "image_cond_hidden_states": randn(gen, BATCH, 16, 4),
        "image_cond_ids": cond_ids,
        "return_dict": False,
    }


def _build_flux() -> tuple[nn.Module, dict[str, Any]]:
    model = named_model(
        "FluxTransformer2DModel",
        patch_size=1,
        in_channels=4,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=[4, 4, 8],
    )
    gen = generator()
    txt_ids, img_ids = _flux_ids(6, 4, 4)
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 4),
        "encoder_hidden_states": randn(gen, BATCH, 6, 32),
        "pooled_projections": randn(gen, BATCH, 32),
        "timestep": timesteps(0.5),
        "img_ids": img_ids,
        "txt_ids": txt_ids,
        "return_dict": False,
    }


TRANSFORMERS: tuple[TinyTransformer, ...] = (
    TinyTransformer("AllegroTransformer3DModel", _build_allegro, "hidden_states", "timestep"),
    TinyTransformer("AnyFlowFARTransformer3DModel", _build_anyflow_far, "hidden_states", "timestep"),
    TinyTransformer("AnyFlowTransformer3DModel", _build_anyflow, "hidden_states", "timestep"),
    TinyTransformer(
        "AuraFlowTransformer2DModel", _build_aura_flow, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer(
        "BriaFibo2Transformer2DModel", _build_bria_fibo2, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer("BriaFiboTransformer2DModel", _build_bria_fibo, "hidden_states", "timestep"),
    TinyTransformer("BriaTransformer2DModel", _build_bria, "hidden_states", "timestep"),
    TinyTransformer(
        "ChromaTransformer2DModel", _build_chroma, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer("ChronoEditTransformer3DModel", _build_chronoedit, "hidden_states", "timestep"),
    TinyTransformer("CogVideoXTransformer3DModel", _build_cogvideox, "hidden_states", "timestep"),
    TinyTransformer("CogView3PlusTransformer2DModel", _build_cogview3plus, "hidden_states", "timestep"),
    TinyTransformer("CogView4Transformer2DModel", _build_cogview4, "hidden_states", "timestep"),
    TinyTransformer("ConsisIDTransformer3DModel", _build_consisid, "hidden_states", "timestep"),
    TinyTransformer("Cosmos3OmniTransformer", _build_cosmos3_omni, "vision_tokens", "vision_timesteps"),
    TinyTransformer(
        "CosmosTransformer3DModel", _build_cosmos, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer("DiTTransformer2DModel", _build_dit, "hidden_states", "timestep"),
    TinyTransformer("EasyAnimateTransformer3DModel", _build_easyanimate, "hidden_states", "timestep"),
    TinyTransformer("ErnieImageTransformer2DModel", _build_ernie_image, "hidden_states", "timestep"),
    TinyTransformer("Flux2Transformer2DModel", _build_flux2, "hidden_states", "timestep", timestep_start=1.0),
    TinyTransformer("Flux3Transformer2DModel", _build_flux3, "hidden_states", "timestep", timestep_start=1.0),
    TinyTransformer("FluxTransformer2DModel", _build_flux, "hidden_states", "timestep", timestep_start=1.0),
)
