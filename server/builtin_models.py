"""The embedded default models: tiny but genuine diffusers pipelines, built offline.

Each entry is a real pipeline class (``FluxPipeline``, ``WanPipeline``) wired to its real component
classes, shrunk until a generation takes a fraction of a second on a CPU. Weights are seeded random and
the tokenizers are built in memory from the word list below, so nothing is downloaded. A build is
written with ``save_pretrained`` into ``<cache_dir>/builtin/<name>-<fingerprint>`` and then loaded
back with ``DiffusionPipeline.from_pretrained``, the path a hub model takes. The fingerprint hashes
the recipe, the seed, the word list and the library versions, so a changed recipe gets a new folder
and an unchanged one is built once.

The settings a model needs at call time (its size, step count, ``max_sequence_length``) belong to its
entry here, not to special cases in the server.

Random weights make noise-like media, but media that depends on the prompt and the seed, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import string
import tempfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from server.model_settings import ModelDefaults, ModelLimits

if TYPE_CHECKING:
    # diffusers' package root types its classes as import-time placeholders; the modules do not.
    from diffusers.pipelines.pipeline_utils import DiffusionPipeline
    from transformers import CLIPTokenizer, T5Tokenizer

DEFAULT_SEED = 0

# Bump when the build code changes in a way the recipe does not show, to retire old folders.
_BUILD_FORMAT = 1

# Each of these words is a single T5 token; CLIP's merges make most of them single tokens too. Any
# other text still tokenizes, character by character, so every prompt conditions the model.
_WORD_LIST = """
    a an the of on in at with and by under over next to
    red green blue yellow purple orange white black gray pink brown
    small large big tiny bright dark old new
    circle square triangle star cat dog bird fish horse tree flower house car boat
    mountain river sea sky sun moon cloud city forest
    left right top bottom center background photo painting video
    walking running flying swimming sitting night day snow rain
"""
WORDS: tuple[str, ...] = tuple(_WORD_LIST.split())

# 77 is CLIP's context length; the pipelines read it from the tokenizer.
_CLIP_MAX_LENGTH = 77
_T5_MAX_LENGTH = 512


@dataclass(frozen=True)
class BuiltinModel:
    """One embedded model: how to build it, and how the server should call it."""

    name: str
    # Constructor arguments per component, as plain data: the folder's fingerprint is taken from it.
    recipe: Mapping[str, Mapping[str, Any]]
    builder: Callable[[Mapping[str, Mapping[str, Any]], int], DiffusionPipeline]
    defaults: ModelDefaults
    limits: ModelLimits
    call_kwargs: Mapping[str, Any]
    # A trained model ships as a saved pipeline folder: it is loaded from there, never built.
    folder: Path | None = None
    # FluxPipeline's default_sample_size (latent pixels), which save_pretrained does not keep.
    sample_size: int | None = None
    # Cache presets measured on this model, replacing its family's (keyed like PRESET_NAMES).
    presets: Callable[[], Mapping[str, Any]] | None = None

    def build(self, seed: int = DEFAULT_SEED) -> DiffusionPipeline:
        """The pipeline in memory, with weights drawn from ``seed`` (same seed, same bits)."""
        return self.builder(self.recipe, seed)

    def fingerprint(self, seed: int = DEFAULT_SEED) -> str:
        import diffusers
        import torch
        import transformers

        described = {
            "format": _BUILD_FORMAT,
            "recipe": self.recipe,
            "seed": seed,
            "words": WORDS,
            # Initialisation and serialisation may change between releases.
            "versions": [torch.__version__, diffusers.__version__, transformers.__version__],
        }
        encoded = json.dumps(described, sort_keys=True, default=repr).encode()
        return hashlib.sha256(encoded).hexdigest()[:12]


def materialize(model: BuiltinModel, cache_dir: Path, *, seed: int = DEFAULT_SEED) -> Path:
    """The folder holding ``model`` saved with ``save_pretrained``, building it if it is missing.

    The build goes to a staging folder that is renamed into place, so a crash or a concurrent
    build never leaves a half-written folder where a complete one is expected.
    """
    if model.folder is not None:
        return model.folder
    folder = cache_dir / "builtin" / f"{model.name}-{model.fingerprint(seed)}"
    if folder.is_dir():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        model.build(seed).save_pretrained(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users of the cache
        try:
            os.rename(staging, folder)
        except OSError:
            # Another process finished the same build first; its folder is as good as ours.
            if not folder.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


# -- tokenizers ---------------------------------------------------------------------------------------


def clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE: every byte is a symbol, plus one merge chain per word of ``WORDS``."""
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    symbols = sorted(ByteLevel.alphabet())
    for symbol in [*symbols, *(s + "</w>" for s in symbols)]:
        vocab.setdefault(symbol, len(vocab))
    # Words sharing a prefix share its merges; a dict keeps each merge once, in first-seen order.
    merges: dict[tuple[str, str], None] = {}
    for word in WORDS:
        pieces = [*word[:-1], word[-1] + "</w>"]
        merged = pieces[0]
        for piece in pieces[1:]:
            merges[(merged, piece)] = None
            merged += piece
            vocab.setdefault(merged, len(vocab))
    # Annotated as list[str], but handed to tokenizers' BPE, which takes pairs.
    return CLIPTokenizer(vocab=vocab, merges=list(merges), model_max_length=_CLIP_MAX_LENGTH)  # type: ignore[arg-type]


def t5_tokenizer() -> T5Tokenizer:
    """Unigram: one piece per word of ``WORDS``, then single characters as the fallback."""
    from transformers import T5Tokenizer

    scores: dict[str, float] = {"<pad>": 0.0, "</s>": 0.0, "<unk>": 0.0, "▁": -2.0}
    scores.update(("▁" + word, -1.0) for word in WORDS)
    for char in string.printable:
        if not char.isspace():
            scores.setdefault("▁" + char, -3.0)
            scores.setdefault(char, -4.0)
    return T5Tokenizer(vocab=list(scores.items()), extra_ids=0, model_max_length=_T5_MAX_LENGTH)


# -- seeded construction ------------------------------------------------------------------------------


def _seeded(seed: int, makers: Mapping[str, Callable[[], Any]]) -> dict[str, Any]:
    """Each component built with weights from its own stream, leaving the global RNG as it was.

    One stream per component means a change to one component's shape leaves the others' weights
    untouched.
    """
    import torch

    built = {}
    for name, make in makers.items():
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            built[name] = make()
    return built


def _t5_config(tokenizer: T5Tokenizer, recipe: Mapping[str, Any]) -> dict[str, Any]:
    return {
        **recipe,
        "vocab_size": len(tokenizer),
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "decoder_start_token_id": tokenizer.pad_token_id,
    }


# -- tiny-flux -----------------------------------------------------------------------------------------

_T5_ENCODER = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 2,
    "num_heads": 4,
    "relative_attention_num_buckets": 16,
    "feed_forward_proj": "gated-gelu",
    "dropout_rate": 0.0,
}

_FLUX_RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 2 double-stream + 4 single-stream blocks, 2 heads of 32 channels; RoPE axes sum to the head dim.
    # in_channels is 4x the VAE's latent channels: Flux packs 2x2 latent patches into one token.
    "transformer": {
        "patch_size": 1,
        "in_channels": 32,
        "num_layers": 2,
        "num_single_layers": 4,
        "attention_head_dim": 32,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "guidance_embeds": False,
        "axes_dims_rope": (8, 12, 12),
    },
    # Three resolutions, so 4x downsampling: 64x64 pixels -> 16x16x8 latent -> 8x8 = 64 tokens.
    # shift and scale are not the identity so that decoding exercises them.
    "vae": {
        "block_out_channels": (16, 32, 32),
        "down_block_types": ("DownEncoderBlock2D",) * 3,
        "up_block_types": ("UpDecoderBlock2D",) * 3,
        "layers_per_block": 1,
        "latent_channels": 8,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
        "use_quant_conv": False,
        "use_post_quant_conv": False,
        "sample_size": 64,
        "scaling_factor": 0.6,
        "shift_factor": 0.05,
    },
    # The pipeline takes CLIP's pooled output (the first end-of-text token), so pad = eos.
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 128,
        "projection_dim": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "max_position_embeddings": _CLIP_MAX_LENGTH,
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
    },
    "text_encoder_2": _T5_ENCODER,
    # FLUX.1-dev's schedule: the shift follows the image's token count.
    "scheduler": {
        "shift": 3.0,
        "use_dynamic_shifting": True,
        "base_shift": 0.5,
        "max_shift": 1.15,
        "base_image_seq_len": 256,
        "max_image_seq_len": 4096,
    },
}


def _build_flux(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    tokenizer = clip_tokenizer()
    tokenizer_2 = t5_tokenizer()
    modules = _seeded(
        seed,
        {
            "transformer": lambda: FluxTransformer2DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKL(**recipe["vae"]),
            "text_encoder": lambda: CLIPTextModel(
                CLIPTextConfig(**recipe["text_encoder"], vocab_size=len(tokenizer))
            ),
            "text_encoder_2": lambda: T5EncoderModel(
                T5Config(**_t5_config(tokenizer_2, recipe["text_encoder_2"]))
            ),
        },
    )
    modules.update(
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=FlowMatchEulerDiscreteScheduler(**recipe["scheduler"]),
    )
    return FluxPipeline(**modules)


# -- tiny-wan ------------------------------------------------------------------------------------------

_WAN_LATENT_CHANNELS = 8

_WAN_RECIPE: Mapping[str, Mapping[str, Any]] = {
    # 4 blocks, 2 heads of 16 channels, 2x2 spatial patches.
    "transformer": {
        "patch_size": (1, 2, 2),
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "in_channels": _WAN_LATENT_CHANNELS,
        "out_channels": _WAN_LATENT_CHANNELS,
        "text_dim": 64,
        "freq_dim": 32,
        "ffn_dim": 64,
        "num_layers": 4,
        "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads",
        "rope_max_seq_len": 32,
    },
    # 8x spatial and 4x temporal compression, as in Wan 2.1: 5 frames of 32x32 -> 2 latent frames of
    # 4x4. The latent statistics are not the identity so that decoding exercises them.
    "vae": {
        "base_dim": 8,
        "z_dim": _WAN_LATENT_CHANNELS,
        "dim_mult": [1, 1, 1, 1],
        "num_res_blocks": 1,
        "temperal_downsample": [False, True, True],
        "latents_mean": [round(0.1 * i - 0.35, 2) for i in range(_WAN_LATENT_CHANNELS)],
        "latents_std": [round(0.8 + 0.05 * i, 2) for i in range(_WAN_LATENT_CHANNELS)],
    },
    "text_encoder": _T5_ENCODER,
    # Wan 2.1's text-to-video scheduler.
    "scheduler": {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": 3.0},
}


def _build_wan(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from diffusers.pipelines.wan.pipeline_wan import WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    tokenizer = t5_tokenizer()
    modules = _seeded(
        seed,
        {
            "transformer": lambda: WanTransformer3DModel(**recipe["transformer"]),
            "vae": lambda: AutoencoderKLWan(**recipe["vae"]),
            "text_encoder": lambda: UMT5EncoderModel(
                UMT5Config(**_t5_config(tokenizer, recipe["text_encoder"]))
            ),
        },
    )
    modules.update(tokenizer=tokenizer, scheduler=UniPCMultistepScheduler(**recipe["scheduler"]))
    return WanPipeline(**modules)


# -- shapes-flux ---------------------------------------------------------------------------------------

# Trained here on 64x64 renders of coloured shapes (``python -m shapes.train``; docs/shapes-model.md).
SHAPES_FLUX_FOLDER = Path(__file__).resolve().parent / "assets" / "shapes-flux"


def _load_shipped(recipe: Mapping[str, Mapping[str, Any]], seed: int) -> DiffusionPipeline:
    """The shipped weights: trained, so the seed has nothing to draw."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline.from_pretrained(SHAPES_FLUX_FOLDER, local_files_only=True)


def _shapes_flux_presets() -> Mapping[str, Any]:
    """The fastest point at 30 / 35 / 40 dB PSNR against the uncached image, measured at the default
    true CFG 3 over 50 prompts (docs/quality.md): TaylorSeer lite at interval 4 runs 35% of the
    blocks (32.2 dB, 2.2x), at interval 3 45% (36.8 dB, 1.8x), at interval 2 55% (40.3 dB, 1.5x).
    """
    from .presets import taylorseer_lite

    return {
        "fast": taylorseer_lite(4),
        "balanced": taylorseer_lite(3),
        "quality": taylorseer_lite(2),
    }


# -- the table -----------------------------------------------------------------------------------------

# Prompts this short fit T5's 16 tokens loosely; longer ones are truncated by the tokenizer.
_MAX_PROMPT_CHARS = 1000

BUILTIN_MODELS: Mapping[str, BuiltinModel] = MappingProxyType(
    {
        # First, so that it answers image requests that name no model.
        "shapes-flux": BuiltinModel(
            name="shapes-flux",
            recipe=MappingProxyType({}),
            builder=_load_shipped,
            # True CFG (one extra transformer call per step) is what gets the colours and sizes right.
            defaults=ModelDefaults(
                width=64, height=64, num_frames=None, steps=20, guidance_scale=3.0, fps=None
            ),
            # Trained at 64x64 only: larger sizes are allowed but leave its training distribution.
            limits=ModelLimits(
                max_width=128,
                max_height=128,
                max_pixels=128 * 128,
                max_frames=1,
                max_steps=100,
                max_n=8,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            # Trained with T5 padded to 16 tokens; the joint attention sees the padding, so a longer
            # pad is a different input (colour accuracy falls from 0.93 at 16 to 0 at 512).
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
            folder=SHAPES_FLUX_FOLDER,
            sample_size=16,
            presets=_shapes_flux_presets,
        ),
        "tiny-flux": BuiltinModel(
            name="tiny-flux",
            recipe=_FLUX_RECIPE,
            builder=_build_flux,
            defaults=ModelDefaults(
                width=64, height=64, num_frames=None, steps=10, guidance_scale=1.0, fps=None
            ),
            limits=ModelLimits(
                max_width=256,
                max_height=256,
                max_pixels=256 * 256,
                max_frames=1,
                max_steps=100,
                max_n=8,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            # The pipeline's default pads T5 to 512 tokens: 30x the work of the whole transformer here.
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
        ),
        "tiny-wan": BuiltinModel(
            name="tiny-wan",
            recipe=_WAN_RECIPE,
            builder=_build_wan,
            # Wan runs classifier-free guidance by default (two transformer calls per step); so does
            # this model, so that both branches are exercised.
            defaults=ModelDefaults(width=32, height=32, num_frames=5, steps=10, guidance_scale=5.0, fps=8),
            limits=ModelLimits(
                max_width=128,
                max_height=128,
                max_pixels=128 * 128,
                max_frames=33,
                max_steps=100,
                max_n=4,
                max_prompt_chars=_MAX_PROMPT_CHARS,
            ),
            call_kwargs=MappingProxyType({"max_sequence_length": 16}),
        ),
    }
)

BUILTIN_MODEL_NAMES: tuple[str, ...] = tuple(BUILTIN_MODELS)
