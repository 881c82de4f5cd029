"""Tiny LTX2Pipeline (LTX-2.3): an audio-video transformer of 2 blocks, a Gemma 3 text encoder, text
connectors, a video VAE, an audio VAE and a vocoder with bandwidth extension.

The pipeline makes a video and its sound together: each block runs a video stream and an audio stream,
with cross-attention between them. Gemma 3 encodes the prompt, left-padded to ``max_sequence_length``
(1024) tokens; every one of its hidden states (the embeddings and each layer's output) is stacked, and
the connectors project them per modality and run a 2-block 1D transformer for each, filling the padding
with learnable registers. The audio latents decode to a mel spectrogram, which the vocoder turns into a
16 kHz waveform and its bandwidth extender into 48 kHz. The call returns ``LTX2PipelineOutput(frames,
audio)``: ``frames`` as ``output_type`` asks, ``audio`` always a float32 torch tensor (whatever
``output_type``) of shape (batch, 2 channels, samples) at ``vocoder.config.output_sampling_rate`` (48000)
samples a second. Its length is about ``num_frames / frame_rate`` seconds: that many seconds of latent
audio frames (25 a second), each 4 mel frames of 10 ms, less the 3 the causal decoder trims.

This is the LTX-2.3 architecture, whose guidance the call's defaults follow: classifier-free guidance
(``guidance_scale`` 3, ``audio_guidance_scale`` 7) against ``negative_prompt``, spatio-temporal guidance
(``stg_scale`` 1, perturbing the self-attention of the blocks ``spatio_temporal_guidance_blocks`` names,
[28] by default, which a 2-block transformer does not have: the extra pass then changes nothing) and
modality-isolation guidance (``modality_scale`` 3, a pass without the audio-video cross-attention), so a
default step runs the transformer on a batch of 2 and then twice more. The vocoder's STFT and mel
filterbank are buffers the released checkpoint carries; here they are computed (a Hann-windowed DFT and
triangular mel filters).
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from tiny_pipelines.ltx import RECIPE as LTX_RECIPE
from tiny_pipelines.seeding import seeded
from tiny_pipelines.tokenizers import WORDS, merge_chain

if TYPE_CHECKING:
    import torch
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import Gemma3ForConditionalGeneration, GemmaTokenizer

LATENT_CHANNELS = 8
AUDIO_LATENT_CHANNELS = 2
MEL_BINS = 16
# The audio VAE halves mel bins twice; the transformer reads each latent audio frame's channels and bins as
# one token.
AUDIO_TOKEN_CHANNELS = AUDIO_LATENT_CHANNELS * MEL_BINS // 4
GEMMA_HIDDEN = 32
GEMMA_LAYERS = 2
VIDEO_DIM = 2 * 16
AUDIO_DIM = 2 * 8

# Gemma 3's control tokens: <bos> opens every text, <eos> ends it, <pad> pads; the image markers are named
# by the text encoder's config.
GEMMA_SPECIAL_TOKENS: tuple[str, ...] = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")
GEMMA_EXTRA_TOKENS: tuple[str, ...] = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
)
IMAGE_TOKENS: Mapping[str, str] = {
    "boi_token_index": "<start_of_image>",
    "eoi_token_index": "<end_of_image>",
    "image_token_index": "<image_soft_token>",
}

# The statistics are buffers, not constructor arguments; build sets them. They are not the identity so that
# decoding exercises them.
_STATISTICS = ("latents_mean", "latents_std")


def _statistics(channels: int) -> dict[str, list[float]]:
    return {
        "latents_mean": [round(0.1 * (i % 8) - 0.35, 2) for i in range(channels)],
        "latents_std": [round(0.8 + 0.05 * (i % 8), 2) for i in range(channels)],
    }


RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 blocks; video 2 heads of 16 channels, audio 2 heads of 8. The text reaches the transformer through the
    # connectors, already at each stream's width (no caption projection). Gated attention, cross-attention
    # modulation and perturbable self-attention (for spatio-temporal guidance) are LTX-2.3's.
    "transformer": {
        "in_channels": LATENT_CHANNELS,
        "out_channels": LATENT_CHANNELS,
        "patch_size": 1,
        "patch_size_t": 1,
        "num_attention_heads": 2,
        "attention_head_dim": VIDEO_DIM // 2,
        "cross_attention_dim": VIDEO_DIM,
        "vae_scale_factors": (8, 32, 32),
        "gated_attn": True,
        "cross_attn_mod": True,
        "audio_in_channels": AUDIO_TOKEN_CHANNELS,
        "audio_out_channels": AUDIO_TOKEN_CHANNELS,
        "audio_num_attention_heads": 2,
        "audio_attention_head_dim": AUDIO_DIM // 2,
        "audio_cross_attention_dim": AUDIO_DIM,
        "audio_scale_factor": 4,
        "audio_sampling_rate": 16000,
        "audio_hop_length": 160,
        "audio_gated_attn": True,
        "audio_cross_attn_mod": True,
        "num_layers": 2,
        "caption_channels": GEMMA_HIDDEN,
        "rope_type": "split",
        "use_prompt_embeddings": False,
        "perturbed_attn": True,
    },
    # The stacked hidden states (embeddings + each layer) project to each stream's width; 128 learnable
    # registers fill the padding, so max_sequence_length must be a multiple of 128.
    "connectors": {
        "caption_channels": GEMMA_HIDDEN,
        "text_proj_in_factor": GEMMA_LAYERS + 1,
        "video_connector_num_attention_heads": 2,
        "video_connector_attention_head_dim": VIDEO_DIM // 2,
        "video_connector_num_layers": 2,
        "video_connector_num_learnable_registers": 128,
        "video_gated_attn": True,
        "audio_connector_num_attention_heads": 2,
        "audio_connector_attention_head_dim": AUDIO_DIM // 2,
        "audio_connector_num_layers": 2,
        "audio_connector_num_learnable_registers": 128,
        "audio_gated_attn": True,
        "rope_type": "split",
        "per_modality_projections": True,
        "video_hidden_dim": VIDEO_DIM,
        "audio_hidden_dim": AUDIO_DIM,
        "proj_bias": True,
    },
    # LTX-2.3's layout with its widths divided by 32: 4x4 pixel patches, then halvings in space, time, and
    # both twice: 32x spatial, 8x temporal, so 128x128 pixels -> a 4x4 token grid and 1 + 8k frames -> k + 1
    # latent frames. The decoder's upsamplers divide their channels by upsample_factor, as released.
    "vae": {
        "latent_channels": LATENT_CHANNELS,
        "block_out_channels": (8, 16, 32, 32),
        "decoder_block_out_channels": (8, 16, 16, 32),
        "layers_per_block": (1, 1, 1, 1, 1),
        "decoder_layers_per_block": (1, 1, 1, 1, 1),
        "spatio_temporal_scaling": (True, True, True, True),
        "decoder_spatio_temporal_scaling": (True, True, True, True),
        "decoder_inject_noise": (False, False, False, False, False),
        "downsample_type": ("spatial", "temporal", "spatiotemporal", "spatiotemporal"),
        "upsample_type": ("spatiotemporal", "spatiotemporal", "temporal", "spatial"),
        "upsample_residual": (False, False, False, False),
        "upsample_factor": (2, 2, 1, 2),
        "patch_size": 4,
        "patch_size_t": 1,
        "decoder_causal": False,
        "decoder_spatial_padding_mode": "zeros",
        "spatial_compression_ratio": 32,
        "temporal_compression_ratio": 8,
        **_statistics(LATENT_CHANNELS),
    },
    # Mel spectrograms of 16 bins at 100 frames a second (16 kHz, hop 160), 4x down in time and bins. The
    # latent statistics are per packed token channel (latent channels x latent bins).
    "audio_vae": {
        "base_channels": 8,
        "output_channels": 2,
        "ch_mult": (1, 2, 2),
        "num_res_blocks": 1,
        "in_channels": 2,
        "latent_channels": AUDIO_LATENT_CHANNELS,
        "mel_bins": MEL_BINS,
        "sample_rate": 16000,
        "mel_hop_length": 160,
        **_statistics(AUDIO_TOKEN_CHANNELS),
    },
    # Stage 1 turns the 2-channel mel spectrogram into 16 kHz (160 samples a frame); the bandwidth extender
    # reads a 64-bin mel of that and adds the 48 kHz residual. Channels halve at each upsampling.
    "vocoder": {
        "in_channels": 2 * MEL_BINS,
        "hidden_channels": 64,
        "out_channels": 2,
        "upsample_kernel_sizes": [11, 4, 4, 4, 4, 4],
        "upsample_factors": [5, 2, 2, 2, 2, 2],
        "act_fn": "snakebeta",
        "antialias": True,
        "final_act_fn": None,
        "final_bias": False,
        "bwe_in_channels": 2 * 64,
        "bwe_hidden_channels": 32,
        "bwe_out_channels": 2,
        "bwe_upsample_kernel_sizes": [12, 11, 4, 4, 4],
        "bwe_upsample_factors": [6, 5, 2, 2, 2],
        "num_mel_channels": 64,
        "input_sampling_rate": 16000,
        "output_sampling_rate": 48000,
    },
    # Two layers, a sliding-window one and a global one, as Gemma 3 alternates them. The SigLIP vision tower
    # is never run on text, but it is part of the class and of the saved model.
    "text_encoder": {
        "text_config": {
            "hidden_size": GEMMA_HIDDEN,
            "intermediate_size": 64,
            "num_hidden_layers": GEMMA_LAYERS,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "head_dim": 16,
            "query_pre_attn_scalar": 16,
            "sliding_window": 1024,
            "layer_types": ["sliding_attention", "full_attention"],
            "max_position_embeddings": 2048,
        },
        "vision_config": {
            "hidden_size": 16,
            "intermediate_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 28,
            "patch_size": 14,
        },
        "mm_tokens_per_image": 4,
    },
    # LTX-2's schedule, as LTX-Video's: the shift follows the video's token count, and sigmas end at 0.1.
    "scheduler": LTX_RECIPE["scheduler"],
}

# Sizes must be multiples of 32 (the pipeline checks), frame counts 1 + 8k. 128x128 pixels -> a 4x4 token
# grid; 9 frames -> 2 latent frames, and at the default 24 frames a second 0.375 s: 9 latent audio frames, 33
# mel frames, 15840 samples at 48 kHz (0.33 s).
SMALL_CALL: Mapping[str, Any] = {"width": 128, "height": 128, "num_frames": 9}


def tokenizer(words: Iterable[str] = WORDS) -> GemmaTokenizer:
    """A Gemma tokenizer (BPE with byte fallback over "▁"-marked words, <bos> first) in which each word is
    one token, built through the class's own constructor as ``from_pretrained`` rebuilds it."""
    from transformers import GemmaTokenizer

    vocab: dict[str, int] = {token: i for i, token in enumerate((*GEMMA_SPECIAL_TOKENS, *GEMMA_EXTRA_TOKENS))}
    for byte in range(256):
        vocab[f"<0x{byte:02X}>"] = len(vocab)
    for char in ["▁", *(c for c in string.printable if not c.isspace())]:
        vocab.setdefault(char, len(vocab))
    merges: dict[tuple[str, str], None] = {}

    forms = [form for word in dict.fromkeys(words) for form in ("▁" + word, word)]
    pending = [list(form) for form in forms]
    while True:
        # As in tokenizers.clip_tokenizer: a form cut apart by another's merges gets a chain of its own.
        for pieces in pending:
            merge_chain(pieces, merges, vocab)
        # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
        pairs: list[Any] = list(merges)
        gemma = GemmaTokenizer(
            vocab=dict(vocab),
            merges=pairs,
            add_bos_token=True,
            extra_special_tokens=list(GEMMA_EXTRA_TOKENS),
        )
        model = gemma.backend_tokenizer.model
        pending = [[token.value for token in model.tokenize(form)] for form in forms]
        pending = [pieces for pieces in pending if len(pieces) > 1]
        if not pending:
            return gemma


def text_encoder(tokenizer: GemmaTokenizer, recipe: Mapping[str, Any]) -> Gemma3ForConditionalGeneration:
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    ids = {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    image_ids: dict[str, Any] = {
        name: tokenizer.convert_tokens_to_ids(token) for name, token in IMAGE_TOKENS.items()
    }
    config = Gemma3Config(
        text_config={**recipe["text_config"], **ids},
        vision_config=dict(recipe["vision_config"]),
        mm_tokens_per_image=recipe["mm_tokens_per_image"],
        **image_ids,
    )
    return Gemma3ForConditionalGeneration(config)


def stft_basis(filter_length: int, window_length: int) -> torch.Tensor:
    """The causal STFT's forward basis: a Hann-windowed DFT, real parts then imaginary parts, one filter a
    row, shaped as ``CausalSTFT.forward_basis``."""
    import torch

    frequencies = torch.arange(filter_length // 2 + 1, dtype=torch.float64)[:, None]
    times = torch.arange(filter_length, dtype=torch.float64)[None, :]
    angle = 2 * math.pi * frequencies * times / filter_length
    window = torch.zeros(filter_length, dtype=torch.float64)
    window[:window_length] = torch.hann_window(window_length, periodic=True, dtype=torch.float64)
    basis = torch.cat([torch.cos(angle), -torch.sin(angle)]) * window
    return basis[:, None, :].float()


def mel_filterbank(num_mels: int, filter_length: int, sampling_rate: int) -> torch.Tensor:
    """Triangular filters evenly spaced on the mel scale from 0 Hz to Nyquist, shaped (num_mels, bins)."""
    import torch

    def mel(hz: torch.Tensor) -> torch.Tensor:
        return 2595.0 * torch.log10(1.0 + hz / 700.0)

    def hz(mels: torch.Tensor) -> torch.Tensor:
        return 700.0 * (10.0 ** (mels / 2595.0) - 1.0)

    nyquist = torch.tensor(sampling_rate / 2, dtype=torch.float64)
    edges = hz(torch.linspace(0.0, float(mel(nyquist)), num_mels + 2, dtype=torch.float64))
    bins = torch.linspace(0.0, float(nyquist), filter_length // 2 + 1, dtype=torch.float64)
    lower, center, upper = edges[:-2, None], edges[1:-1, None], edges[2:, None]
    rising = (bins - lower) / (center - lower)
    falling = (upper - bins) / (upper - center)
    return torch.clamp(torch.minimum(rising, falling), min=0.0).float()


def build(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    import torch
    from diffusers.models.autoencoders.autoencoder_kl_ltx2 import AutoencoderKLLTX2Video
    from diffusers.models.autoencoders.autoencoder_kl_ltx2_audio import AutoencoderKLLTX2Audio
    from diffusers.models.transformers.transformer_ltx2 import LTX2VideoTransformer3DModel
    from diffusers.pipelines.ltx2.connectors import LTX2TextConnectors
    from diffusers.pipelines.ltx2.pipeline_ltx2 import LTX2Pipeline
    from diffusers.pipelines.ltx2.vocoder import LTX2VocoderWithBWE
    from diffusers.schedulers.scheduling_flow_match_euler_discrete import FlowMatchEulerDiscreteScheduler

    def with_statistics(make: Any, config: Mapping[str, Any]) -> Any:
        model = make(**{key: value for key, value in config.items() if key not in _STATISTICS})
        for name in _STATISTICS:
            getattr(model, name).copy_(torch.tensor(config[name]))
        return model.eval()

    def vocoder() -> LTX2VocoderWithBWE:
        # The STFT's inverse basis, which the vocoder's forward never reads, stays zero.
        model = LTX2VocoderWithBWE(**recipe["vocoder"]).eval()
        config = model.config
        stft = model.mel_stft.stft_fn
        stft.forward_basis.copy_(stft_basis(config.filter_length, config.window_length))
        model.mel_stft.mel_basis.copy_(
            mel_filterbank(config.num_mel_channels, config.filter_length, config.input_sampling_rate)
        )
        return model

    gemma_tokenizer = tokenizer()
    modules = seeded(
        seed,
        {
            "transformer": lambda: LTX2VideoTransformer3DModel(**recipe["transformer"]).eval(),
            "connectors": lambda: LTX2TextConnectors(**recipe["connectors"]).eval(),
            "vae": lambda: with_statistics(AutoencoderKLLTX2Video, recipe["vae"]),
            "audio_vae": lambda: with_statistics(AutoencoderKLLTX2Audio, recipe["audio_vae"]),
            "vocoder": vocoder,
            "text_encoder": lambda: text_encoder(gemma_tokenizer, recipe["text_encoder"]).eval(),
        },
    )
    modules.update(
        tokenizer=gemma_tokenizer, scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"])
    )
    return LTX2Pipeline(**modules)
