"""The transformer classes from Mochi to Z-Image, each built tiny from diffusers' own test configuration (or, for
classes without one, from the signature of ``__init__``), with the inputs of one batch-2 denoiser call."""

from __future__ import annotations

from typing import Any
from unittest import mock

import torch
from diffusers.models import (
    MochiTransformer3DModel,
    MotifVideoTransformer3DModel,
    NucleusMoEImageTransformer2DModel,
    OmniGenTransformer2DModel,
    OvisImageTransformer2DModel,
    PixArtTransformer2DModel,
    PRXTransformer2DModel,
    QwenImage21Transformer2DModel,
    QwenImageTransformer2DModel,
    SanaTransformer2DModel,
    SanaVideoTransformer3DModel,
    SanaWMLTX2RefinerTransformer3DModel,
    SanaWMTransformer3DModel,
    SD3Transformer2DModel,
    SkyReelsV2Transformer3DModel,
    Transformer2DModel,
    WanAnimate2Transformer3DModel,
    WanAnimateTransformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
    ZImageTransformer2DModel,
)
from diffusers.models.transformers import transformer_wan_animate_2
from diffusers.models.transformers.transformer_wan_animate_2 import WanAnimate2KVCache
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask

from tiny_pipelines.transformers import BATCH, TinyTransformer, generator, randn, seeded_model, timesteps

Built = tuple[nn.Module, dict[str, Any]]

# Half of each scale a pipeline passes, so a call sits mid-schedule.
MID_1000 = 500.0
MID_1 = 0.5


def _ones(length: int, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    return torch.ones(BATCH, length, dtype=dtype)


def _build_mochi() -> Built:
    model = seeded_model(
        MochiTransformer3DModel,
        patch_size=2,
        num_attention_heads=2,
        attention_head_dim=8,
        num_layers=2,
        pooled_projection_dim=16,
        in_channels=4,
        qk_norm="rms_norm",
        text_embed_dim=16,
        time_embed_dim=4,
        activation_fn="swiglu",
        max_sequence_length=16,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "timestep": timesteps(MID_1000),
        "encoder_attention_mask": _ones(8),
        "return_dict": False,
    }


def _build_motif_video() -> Built:
    model = seeded_model(
        MotifVideoTransformer3DModel,
        in_channels=33,
        out_channels=16,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        # As the released 2B model (dual-stream, single-stream, then DDT decoder blocks with shared text
        # cross-attention): the last 2 single-stream blocks are its decoder.
        num_single_layers=4,
        num_decoder_layers=2,
        enable_text_cross_attention_dual=True,
        enable_text_cross_attention_single=True,
        patch_size=2,
        patch_size_t=1,
        text_embed_dim=16,
        rope_axes_dim=(4, 4, 4),
    )
    gen = generator()
    return model, {
        # 33 channels: the pipeline concatenates latents, the condition latents and their mask.
        "hidden_states": randn(gen, BATCH, 33, 2, 8, 8),
        "timestep": timesteps(MID_1000),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "encoder_attention_mask": _ones(8),
        "return_dict": False,
    }


def _build_nucleusmoe_image() -> Built:
    model = seeded_model(
        NucleusMoEImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        # dim 64: the dense MLP's inner size rounds down to a multiple of 128 and vanishes below dim 48.
        num_attention_heads=4,
        num_key_value_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
        moe_enabled=True,
        # Block 0 dense, block 1 routed, as in the released model's first and middle blocks.
        dense_moe_strategy="leave_first_block_dense",
        num_experts=4,
        moe_intermediate_dim=32,
        # Expert-choice capacity must not exceed the 16 image tokens: ceil(2 * 16 / 4) = 8.
        capacity_factors=2.0,
    )
    # The experts' weights are allocated with torch.empty and only a checkpoint fills them: drawn here,
    # or the routed block computes on whatever the memory held (NaN at times).
    experts = generator(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith((".gate_up_proj", ".down_proj")):
                parameter.copy_(0.05 * torch.randn(parameter.shape, generator=experts))
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 16),
        "img_shapes": [(1, 4, 4)] * BATCH,
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "encoder_hidden_states_mask": _ones(8, torch.long),
        "timestep": timesteps(MID_1),
        "return_dict": False,
    }


def _build_omnigen() -> Built:
    model = seeded_model(
        OmniGenTransformer2DModel,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=4,
        intermediate_size=64,
        num_layers=2,
        pad_token_id=0,
        vocab_size=64,
        in_channels=4,
        time_step_dim=16,
        pos_embed_max_size=16,
        rope_scaling={"long_factor": [1.0] * 4, "short_factor": [1.0] * 4},
    )
    gen = generator()
    text_tokens, image_tokens = 6, 16
    length = text_tokens + 1 + image_tokens
    # As OmniGen's processor builds it: causal over the prompt, bidirectional over time token and image.
    mask = torch.tril(torch.ones(length, length))
    mask[text_tokens:, text_tokens:] = 1.0
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(MID_1),
        "input_ids": torch.randint(1, 64, (BATCH, text_tokens), generator=gen),
        "input_img_latents": [],
        "input_image_sizes": {},
        "attention_mask": mask.expand(BATCH, length, length).clone(),
        "position_ids": torch.arange(length).expand(BATCH, length).clone(),
        "return_dict": False,
    }


def _image_ids(height: int, width: int) -> torch.Tensor:
    ids = torch.zeros(height, width, 3)
    ids[..., 1] = torch.arange(height)[:, None]
    ids[..., 2] = torch.arange(width)[None, :]
    return ids.reshape(height * width, 3)


def _build_ovis_image() -> Built:
    model = seeded_model(
        OvisImageTransformer2DModel,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(4, 4, 8),
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 16),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "timestep": timesteps(MID_1),
        "img_ids": _image_ids(4, 4),
        "txt_ids": torch.zeros(8, 3),
        "return_dict": False,
    }


def _build_prx() -> Built:
    model = seeded_model(
        PRXTransformer2DModel,
        in_channels=4,
        patch_size=2,
        context_in_dim=16,
        hidden_size=32,
        mlp_ratio=3.5,
        num_heads=2,
        depth=2,
        axes_dim=[8, 8],
    )
    gen = generator()
    # PRX zero-initialises every block's modulation, which leaves an untrained block the identity.
    for block in model.blocks:
        nn.init.normal_(block.modulation.lin.weight, std=0.1, generator=gen)
        nn.init.normal_(block.modulation.lin.bias, std=0.1, generator=gen)
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(MID_1),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "attention_mask": _ones(8),
        "return_dict": False,
    }


def _build_pixart() -> Built:
    model = seeded_model(
        PixArtTransformer2DModel,
        sample_size=8,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=2,
        in_channels=4,
        cross_attention_dim=16,
        out_channels=8,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
        caption_channels=16,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "timestep": timesteps(MID_1000),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
        "encoder_attention_mask": _ones(8, torch.long),
        "return_dict": False,
    }


def _build_qwenimage21() -> Built:
    model = seeded_model(
        QwenImage21Transformer2DModel,
        patch_size=1,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        context_in_dim=16,
        mlp_ratio=3,
        axes_dims_rope=(4, 6, 6),
    )
    gen = generator()
    text, target = 6, 16
    # One slot per 2x2 group of target latents follows the prompt, as the pipeline appends them.
    img_mask = torch.cat([torch.zeros(BATCH, text, dtype=torch.bool), _ones(target // 4)], dim=1)
    return model, {
        "hidden_states": randn(gen, BATCH, target, 16),
        "encoder_hidden_states": randn(gen, BATCH, text, 16),
        "timestep": timesteps(MID_1),
        "img_shapes": [[(1, 4, 4)]] * BATCH,
        "img_mask": img_mask,
        "encoder_hidden_states_mask": _ones(text),
        "return_dict": False,
    }


def _build_qwenimage() -> Built:
    model = seeded_model(
        QwenImageTransformer2DModel,
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        guidance_embeds=False,
        axes_dims_rope=(8, 4, 4),
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 16, 16),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "encoder_hidden_states_mask": _ones(8, torch.long),
        "timestep": timesteps(MID_1),
        "img_shapes": [(1, 4, 4)] * BATCH,
        "return_dict": False,
    }


def _build_sd3() -> Built:
    # SD3.5's layout: the first block with dual attention, RMS qk-norm everywhere.
    model = seeded_model(
        SD3Transformer2DModel,
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=3,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=16,
        pooled_projection_dim=16,
        out_channels=4,
        pos_embed_max_size=16,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "pooled_projections": randn(gen, BATCH, 16),
        "timestep": timesteps(MID_1000),
        "return_dict": False,
    }


def _build_sana() -> Built:
    model = seeded_model(
        SanaTransformer2DModel,
        patch_size=1,
        in_channels=4,
        out_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=8,
        cross_attention_dim=16,
        caption_channels=16,
        sample_size=8,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "timestep": timesteps(MID_1000),
        "encoder_attention_mask": _ones(8, torch.long),
        "return_dict": False,
    }


def _build_sana_video() -> Built:
    model = seeded_model(
        SanaVideoTransformer3DModel,
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=12,
        num_layers=2,
        num_cross_attention_heads=2,
        cross_attention_head_dim=12,
        cross_attention_dim=24,
        caption_channels=16,
        mlp_ratio=2.5,
        sample_size=8,
        patch_size=(1, 2, 2),
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 2, 8, 8),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "timestep": timesteps(MID_1000),
        "encoder_attention_mask": _ones(8, torch.long),
        "return_dict": False,
    }


def _build_sana_wm_refiner() -> Built:
    model = seeded_model(
        SanaWMLTX2RefinerTransformer3DModel,
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
        caption_channels=16,
        rope_double_precision=False,
    )
    gen = generator()
    frames, height, width = 2, 4, 4
    tokens = frames * height * width
    # The refiner takes the video RoPE from its caller, built for the absolute frame positions.
    rotary = model.build_rotary_emb_for_absolute_positions(
        batch_size=BATCH,
        frame_positions=list(range(frames)),
        height=height,
        width=width,
        device=torch.device("cpu"),
        fps=24.0,
    )
    return model, {
        "hidden_states": randn(gen, BATCH, tokens, 4),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        # Per token and already multiplied by ``timestep_scale_multiplier`` (1000), as the refiner passes it.
        "timestep": torch.full((BATCH, tokens), MID_1000),
        "video_rotary_emb": rotary,
        "encoder_attention_mask": _ones(8, torch.long),
        "return_dict": False,
    }


def _camera_raymap(frames: int, height: int, width: int) -> torch.Tensor:
    """Per latent frame: a flattened 4x4 camera pose (relative to frame 0) and latent-scale intrinsics."""
    poses = torch.eye(4).repeat(frames, 1, 1)
    poses[:, 2, 3] = 0.1 * torch.arange(frames)
    intrinsics = torch.tensor([float(width), float(height), width / 2, height / 2]).expand(frames, 4)
    raymap = torch.cat([poses.reshape(frames, 16), intrinsics], dim=-1)
    return raymap.expand(BATCH, frames, 20).clone()


def _build_sana_wm() -> Built:
    model = seeded_model(
        SanaWMTransformer3DModel,
        in_channels=8,
        num_layers=2,
        hidden_size=64,
        num_attention_heads=2,
        patch_size=(1, 1, 1),
        # Block 0 runs the gated-delta-net attention, block 1 its softmax counterpart.
        softmax_every_n=2,
        linear_head_dim=32,
        caption_channels=16,
        mlp_ratio=2.0,
    )
    gen = generator()
    frames, height, width = 2, 4, 4
    return model, {
        "hidden_states": randn(gen, BATCH, 8, frames, height, width),
        # Per latent frame, (B, 1, T), as the pipeline passes it.
        "timestep": torch.full((BATCH, 1, frames), MID_1000),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "mask": _ones(8, torch.long),
        "camera_conditions": _camera_raymap(frames, height, width),
        "chunk_plucker": randn(gen, BATCH, 48, frames, height, width),
        "return_dict": False,
    }


def _wan_video_inputs(gen: torch.Generator, in_channels: int) -> dict[str, Any]:
    return {
        "hidden_states": randn(gen, BATCH, in_channels, 2, 8, 8),
        "timestep": timesteps(MID_1000),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "return_dict": False,
    }


def _build_skyreels_v2() -> Built:
    model = seeded_model(
        SkyReelsV2Transformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model, _wan_video_inputs(generator(), 4)


def _build_transformer_2d() -> Built:
    # The DiT layout (patched input, adaLN-zero with class labels): the one use of this class as a denoiser.
    model = seeded_model(
        Transformer2DModel,
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=8,
        num_layers=2,
        sample_size=8,
        patch_size=2,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        attention_bias=True,
        norm_type="ada_norm_zero",
        norm_elementwise_affine=False,
    )
    gen = generator()
    return model, {
        "hidden_states": randn(gen, BATCH, 4, 8, 8),
        "timestep": timesteps(MID_1000),
        # A class and the null class, as DiT's classifier-free guidance batches them.
        "class_labels": torch.tensor([3, 1000]),
        "return_dict": False,
    }


def _eager_block_mask(*args: Any, **kwargs: Any) -> BlockMask:
    return create_block_mask(*args, **{**kwargs, "_compile": False})


def _build_wan_animate_2() -> Built:
    layers = 2
    model = seeded_model(
        WanAnimate2Transformer3DModel,
        patch_size=(1, 2, 2),
        text_len=8,
        in_dim=4 + 8,
        dim=32,
        ffn_dim=64,
        freq_dim=32,
        text_dim=16,
        out_dim=4,
        num_heads=2,
        num_layers=layers,
        cross_attn_norm=True,
        # The CLIP projection is fixed at 1280 wide (1.6M parameters): left out.
        use_img_emb=False,
    )
    gen = generator()
    reference_frames, frames, height, width = 2, 3, 4, 4
    patches = (height // 2) * (width // 2)
    text = [randn(gen, 8, 16) for _ in range(BATCH)]
    # Denoising calls attend to the reference tokens' K/V, which one reference pass stores first.
    cache = WanAnimate2KVCache(layers)
    # One grid row per sample: the rotary embedding of the cached keys loops over these rows.
    reference_grid = torch.tensor([[reference_frames, height // 2, width // 2]] * BATCH)
    with torch.no_grad():
        model(
            hidden_states=[randn(gen, 4, reference_frames, height, width) for _ in range(BATCH)],
            timestep=timesteps(1.0),
            encoder_hidden_states=text,
            condition_latents=[randn(gen, 8, reference_frames, height, width) for _ in range(BATCH)],
            kv_cache=cache,
            kv_cache_mode="extract",
            seq_len=reference_frames * patches,
            offset_grid_sizes=reference_grid,
        )
    # A 5-frame segment of 32x32 pixels: the block mask spans 5 // 4 + 1 = 2 latent frames of 2x2 patches.
    origin_len, origin_area = 5, [32, 32]
    mask_key = (origin_len // 4 + 1, origin_area[0] * origin_area[1] // 256)
    # The model builds its flex block mask on first use under torch.compile, 5 s on CPU; built eagerly here
    # (the same mask, in milliseconds) and left where the model looks it up.
    with mock.patch.object(transformer_wan_animate_2, "create_block_mask", _eager_block_mask):
        model.block_masks[mask_key] = model.create_mask(*mask_key, torch.device("cpu"))
    return model, {
        "hidden_states": [randn(gen, 4, frames, height, width) for _ in range(BATCH)],
        "timestep": timesteps(MID_1000),
        "encoder_hidden_states": text,
        "condition_latents": [randn(gen, 8, frames, height, width) for _ in range(BATCH)],
        "kv_cache": cache,
        "kv_cache_mode": "cached",
        "seq_len": frames * patches,
        "reference_grid_sizes": reference_grid,
        "origin_len": origin_len,
        "origin_area": origin_area,
        "return_dict": False,
    }


def _build_wan_animate() -> Built:
    model = seeded_model(
        WanAnimateTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=12,
        latent_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=16,
        rope_max_seq_len=32,
        motion_encoder_channel_sizes={"4": 16, "8": 16, "16": 16},
        motion_encoder_size=16,
        motion_style_dim=8,
        motion_dim=4,
        motion_encoder_dim=16,
        face_encoder_hidden_dim=16,
        face_encoder_num_heads=2,
        # A face adapter after blocks 0 and 2, as the released model has one every fifth block.
        inject_face_latents_blocks=2,
    )
    gen = generator()
    return model, {
        # 2 * 4 + 4 channels over T + 1 = 2 latent frames: the reference frame, then the generated one.
        "hidden_states": randn(gen, BATCH, 12, 2, 8, 8),
        "timestep": timesteps(MID_1000),
        "encoder_hidden_states": randn(gen, BATCH, 8, 16),
        "encoder_hidden_states_image": randn(gen, BATCH, 4, 16),
        "pose_hidden_states": randn(gen, BATCH, 4, 1, 8, 8),
        # Four face frames per latent frame; the face encoder's two stride-2 convolutions bring them to one.
        "face_pixel_values": randn(gen, BATCH, 3, 4, 16, 16),
        "return_dict": False,
    }


def _build_wan() -> Built:
    model = seeded_model(
        WanTransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    return model, _wan_video_inputs(generator(), 4)


def _build_wan_vace() -> Built:
    model = seeded_model(
        WanVACETransformer3DModel,
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=256,
        ffn_dim=32,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
        vace_layers=[0, 2],
        vace_in_channels=12,
    )
    gen = generator()
    inputs = _wan_video_inputs(gen, 4)
    inputs["control_hidden_states"] = randn(gen, BATCH, 12, 2, 8, 8)
    return model, inputs


def _build_z_image() -> Built:
    model = seeded_model(
        ZImageTransformer2DModel,
        all_patch_size=(2,),
        all_f_patch_size=(1,),
        in_channels=4,
        dim=32,
        n_layers=2,
        n_refiner_layers=2,
        n_heads=2,
        n_kv_heads=2,
        qk_norm=True,
        cap_feat_dim=16,
        t_scale=1000.0,
        axes_dims=[8, 4, 4],
        axes_lens=[64, 32, 32],
    )
    gen = generator()
    return model, {
        # One (C, F, H, W) latent and one (L, D) prompt per sample.
        "x": [randn(gen, 4, 1, 8, 8) for _ in range(BATCH)],
        "t": timesteps(MID_1),
        "cap_feats": [randn(gen, 8, 16) for _ in range(BATCH)],
        "return_dict": False,
    }


TRANSFORMERS: tuple[TinyTransformer, ...] = (
    # Mochi's scheduler inverts sigmas: the model sees t rising from about 0 to 1000.
    TinyTransformer("MochiTransformer3DModel", _build_mochi, "hidden_states", "timestep"),
    TinyTransformer("MotifVideoTransformer3DModel", _build_motif_video, "hidden_states", "timestep"),
    TinyTransformer(
        "NucleusMoEImageTransformer2DModel",
        _build_nucleusmoe_image,
        "hidden_states",
        "timestep",
        timestep_start=1.0,
    ),
    # OmniGen's scheduler (one train timestep, inverted sigmas) passes t rising from 0 to 1.
    TinyTransformer(
        "OmniGenTransformer2DModel",
        _build_omnigen,
        "hidden_states",
        "timestep",
        timestep_start=0.0,
        timestep_end=1.0,
    ),
    TinyTransformer(
        "OvisImageTransformer2DModel", _build_ovis_image, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer("PRXTransformer2DModel", _build_prx, "hidden_states", "timestep", timestep_start=1.0),
    TinyTransformer("PixArtTransformer2DModel", _build_pixart, "hidden_states", "timestep"),
    TinyTransformer(
        "QwenImage21Transformer2DModel", _build_qwenimage21, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer(
        "QwenImageTransformer2DModel", _build_qwenimage, "hidden_states", "timestep", timestep_start=1.0
    ),
    TinyTransformer("SD3Transformer2DModel", _build_sd3, "hidden_states", "timestep"),
    TinyTransformer("SanaTransformer2DModel", _build_sana, "hidden_states", "timestep"),
    TinyTransformer("SanaVideoTransformer3DModel", _build_sana_video, "hidden_states", "timestep"),
    TinyTransformer(
        "SanaWMLTX2RefinerTransformer3DModel", _build_sana_wm_refiner, "hidden_states", "timestep"
    ),
    TinyTransformer("SanaWMTransformer3DModel", _build_sana_wm, "hidden_states", "timestep"),
    TinyTransformer("SkyReelsV2Transformer3DModel", _build_skyreels_v2, "hidden_states", "timestep"),
    TinyTransformer("Transformer2DModel", _build_transformer_2d, "hidden_states", "timestep"),
    TinyTransformer("WanAnimate2Transformer3DModel", _build_wan_animate_2, "hidden_states", "timestep"),
    TinyTransformer("WanAnimateTransformer3DModel", _build_wan_animate, "hidden_states", "timestep"),
    TinyTransformer("WanTransformer3DModel", _build_wan, "hidden_states", "timestep"),
    TinyTransformer("WanVACETransformer3DModel", _build_wan_vace, "hidden_states", "timestep"),
    # Z-Image's pipeline passes (1000 - t) / 1000: the model sees t rising from 0 to 1.
    TinyTransformer(
        "ZImageTransformer2DModel", _build_z_image, "x", "t", timestep_start=0.0, timestep_end=1.0
    ),
)
