"""Train the shapes model: a VAE, then a Flux transformer with its text encoders, on a time budget.

    python -m shapes.train --out server/assets/shapes-flux --minutes 45

The budget is wall-clock. The VAE gets a fixed share of it, then its decoder alone another share
(the encoder, and so the latent space, frozen); the latents of the training images are encoded
once; a small classifier learns to read shape and size from them (the shape critic); the
transformer trains on the time that is left. Every schedule decays over its stage's time
rather than over a step count. Progress is kept in a work folder (``--work``,
next to ``--out`` by default): a finished VAE, the encoded latents and the critic are reused, and the
transformer's state is saved every few minutes, so a run that is stopped or killed resumes where it
was. Every transformer checkpoint also writes the pipeline to ``--out`` (EMA weights), atomically,
with ``FluxPipeline.save_pretrained``.
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from shapes import dataset, detector, text

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

LATENT_CHANNELS = 8
LATENT_SIDE = dataset.SIZE // 4
BATCH = 32
# The transformer's recipe. A 45-minute run with batch 16, peak rate 3e-3 and noise levels shifted
# up (mean 0.5) reached a lower loss but placed every object in the centre (position 0.19 against
# 0.99 for these values, on the same VAE and latents; docs/shapes-model.md), so these stay.
TRANSFORMER_BATCH = 32
TRANSFORMER_LR = 1e-3
# Noise levels s ~ sigmoid(N(NOISE_MEAN, 1)), SD3's logit-normal.
NOISE_MEAN = 0.0
# Weight of the caption probe's loss (see Denoiser). The pooled CLIP embedding is what the
# transformer's AdaLN modulation sees, and the diffusion loss alone barely separates the shape
# words in it (circle against square: cosine 0.98 after a full run without the probe), and the
# transformer drew circles and squares alike (docs/shapes-model.md).
CAPTION_LOSS = 0.1
# Weight of the shape critic's loss (see LatentCritic). A circle and a square of one size differ in a
# few corner pixels, so the flow-matching loss barely tells them apart; the critic's cross-entropy on
# the transformer's estimate of the clean latent does. Continuing the previous checkpoint for 2,000
# steps with it raised shape from 0.47 to 0.64 against the same continuation without it
# (docs/shapes-model.md).
SHAPE_LOSS = 0.1
# ...but only over the last part of the transformer's time. On from the first step, the model drew
# textures the critic reads as shapes and never learnt position (0.44; fg 0.87, size 0.76): it had
# not learnt to draw yet, and the critic was the easier target. On a model that draws, it sharpens
# what is drawn.
CRITIC_FROM = 0.7
CRITIC_STEPS = 800

VAE_CONFIG: dict[str, Any] = {
    "block_out_channels": (16, 32, 32),
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "layers_per_block": 1,
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "sample_size": dataset.SIZE,
}
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
# FLUX.1-dev's schedule; for 64 tokens the pipeline's dynamic shift comes to about 1.6.
SCHEDULER_CONFIG: dict[str, Any] = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}


@dataclass(frozen=True)
class Options:
    out: Path
    work: Path
    minutes: float
    seed: int = 0
    images: int = 48_000
    vae_share: float = 0.16
    decoder_share: float = 0.2
    checkpoint_minutes: float = 4.0
    # Caps for smoke tests; the budget decides otherwise.
    vae_steps: int | None = None
    steps: int | None = None
    log_every: int = 50
    batch: int = BATCH
    transformer_batch: int = TRANSFORMER_BATCH
    lr: float = TRANSFORMER_LR
    noise_mean: float = NOISE_MEAN
    caption_loss: float = CAPTION_LOSS
    shape_loss: float = SHAPE_LOSS
    critic_from: float = CRITIC_FROM
    critic_steps: int = CRITIC_STEPS
    compile: bool = True


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def cosine_lr(peak: float, warmup: int, step: int, progress: float) -> float:
    """Linear warmup, then cosine down to 5% of the peak as ``progress`` goes from 0 to 1."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class Stop:
    """Set by SIGTERM / SIGINT while training, so the loop stops at a step boundary and saves."""

    requested = False

    @classmethod
    @contextmanager
    def on_signals(cls) -> Iterator[None]:
        def handler(signum: int, frame: Any) -> None:
            cls.requested = True

        cls.requested = False
        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, old in previous.items():
                signal.signal(sig, old)


def atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


# -- VAE ---------------------------------------------------------------------------------------------


def new_vae(seed: int) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**VAE_CONFIG)


def train_vae(opts: Options, seconds: float) -> AutoencoderKL:
    """Autoencoder training on freshly drawn scenes (rendering costs far less than a step)."""
    path = opts.work / "vae.pt"
    vae = new_vae(opts.seed)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        vae.load_state_dict(saved["state"])
        vae.register_to_config(**saved["latent_stats"])
        log(f"vae: reusing {path} ({saved['steps']} steps)")
        return vae
    rng = np.random.default_rng([opts.seed, 1])
    optimizer = torch.optim.AdamW(vae.parameters(), lr=2e-3)
    start = time.monotonic()
    step = 0
    smoothed = None
    vae.train()
    while not Stop.requested:
        elapsed = time.monotonic() - start
        if elapsed >= seconds or (opts.vae_steps is not None and step >= opts.vae_steps):
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(2e-3, 50, step, elapsed / seconds)
        x = to_pixels(dataset.render_batch([dataset.sample_scene(rng) for _ in range(opts.batch)]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
            recon = vae.decode(z).sample.float()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-5 * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        smoothed = loss.item() if smoothed is None else 0.98 * smoothed + 0.02 * loss.item()
        step += 1
        if step % opts.log_every == 0:
            log(f"vae step {step} loss {smoothed:.4f} ({elapsed:.0f}s)")
    if Stop.requested:
        raise SystemExit("stopped during the VAE stage, which is not resumable; run again to redo it")
    vae.eval()
    stats = latent_stats(
        vae, dataset.render_batch(dataset.scenes(2000 if opts.steps is None else 64, opts.seed + 1))
    )
    vae.register_to_config(**stats)
    psnr = vae_psnr(
        vae, dataset.render_batch(dataset.scenes(500 if opts.steps is None else 16, opts.seed + 2))
    )
    log(f"vae: {step} steps in {time.monotonic() - start:.0f}s, held-out PSNR {psnr:.2f} dB, {stats}")
    atomic_save({"state": vae.state_dict(), "latent_stats": stats, "steps": step, "psnr": psnr}, path)
    return vae


def train_decoder(opts: Options, vae: AutoencoderKL, seconds: float) -> AutoencoderKL:
    """More training for the decoder alone, the encoder frozen.

    The latent space stays exactly the one the transformer learns, so this stage can run before,
    after or beside the transformer's. The VAE's first stage is short, and its decoder is what
    limits fine detail (the points of a small star): this buys reconstruction quality at half the
    cost of a full VAE step.
    """
    path = opts.work / "decoder.pt"
    if path.exists():
        saved = torch.load(path, weights_only=False)
        vae.decoder.load_state_dict(saved["state"])
        log(f"decoder: reusing {path} ({saved['steps']} steps, PSNR {saved['psnr']:.2f} dB)")
        return vae
    rng = np.random.default_rng([opts.seed, 3])
    params = list(vae.decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    start = time.monotonic()
    step, smoothed = 0, float("nan")
    vae.eval()
    vae.decoder.train()
    while not Stop.requested:
        elapsed = time.monotonic() - start
        if elapsed >= seconds or (opts.vae_steps is not None and step >= opts.vae_steps):
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(1e-3, 50, step, elapsed / seconds)
        x = to_pixels(dataset.render_batch([dataset.sample_scene(rng) for _ in range(opts.batch)]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            recon = vae.decode(z).sample.float()
        loss = F.mse_loss(recon, x) + F.l1_loss(recon, x)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        smoothed = loss.item() if math.isnan(smoothed) else 0.98 * smoothed + 0.02 * loss.item()
        step += 1
        if step % opts.log_every == 0:
            log(f"decoder step {step} loss {smoothed:.4f} ({elapsed:.0f}s)")
    if Stop.requested:
        raise SystemExit("stopped during the decoder stage, which is not resumable; run again to redo it")
    vae.eval()
    psnr = vae_psnr(
        vae, dataset.render_batch(dataset.scenes(500 if opts.steps is None else 16, opts.seed + 2))
    )
    log(f"decoder: {step} steps in {time.monotonic() - start:.0f}s, held-out PSNR {psnr:.2f} dB")
    atomic_save({"state": vae.decoder.state_dict(), "steps": step, "psnr": psnr}, path)
    return vae


@torch.no_grad()
def encode_mode(vae: AutoencoderKL, images: np.ndarray, chunk: int = 250) -> torch.Tensor:
    """Posterior modes, unnormalised."""
    parts = [
        vae.encode(to_pixels(images[i : i + chunk])).latent_dist.mode() for i in range(0, len(images), chunk)
    ]
    return torch.cat(parts)


def normalised_latents(vae: AutoencoderKL, images: np.ndarray) -> torch.Tensor:
    """Posterior modes in the transformer's space: (z - shift_factor) * scaling_factor."""
    z = encode_mode(vae, images)
    return (z - vae.config["shift_factor"]) * vae.config["scaling_factor"]


def latent_stats(vae: AutoencoderKL, images: np.ndarray) -> dict[str, float]:
    """The pipeline decodes ``z / scaling_factor + shift_factor``: shift and scale make z ~ (0, 1)."""
    z = encode_mode(vae, images)
    return {"shift_factor": round(z.mean().item(), 5), "scaling_factor": round(1.0 / z.std().item(), 5)}


@torch.no_grad()
def vae_psnr(vae: AutoencoderKL, images: np.ndarray) -> float:
    x = to_pixels(images)
    recon = vae.decode(encode_mode(vae, images)).sample.clamp(-1, 1)
    mse = ((recon - x) / 2).pow(2).mean().item()
    return 10 * math.log10(1.0 / max(mse, 1e-12))


# -- data for the transformer -------------------------------------------------------------------------


def token_ids(captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids exactly as FluxPipeline makes them, both 16 long.

    The pipeline pads CLIP to 77, but CLIP's attention is causal and the pipeline pools at the first
    end-of-text token, so padding to 16 gives the same embedding for a fifth of the work.
    """
    clip = text.clip_tokenizer(dataset.WORDS)
    t5 = text.t5_tokenizer(dataset.WORDS)
    kwargs: dict[str, Any] = {
        "padding": "max_length",
        "max_length": text.T5_LENGTH,
        "truncation": True,
        "return_tensors": "pt",
    }
    return clip(list(captions), **kwargs).input_ids, t5(list(captions), **kwargs).input_ids


# What each caption says, one class per attribute; the last class of size and position is "not said".
CAPTION_ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": dataset.SHAPES,
    "fg": dataset.COLOUR_NAMES,
    "bg": dataset.COLOUR_NAMES,
    "size": tuple(dataset.SIZES),
    "position": tuple(dataset.POSITIONS),
}
CAPTION_CLASSES = [
    len(values) + (name in ("size", "position")) for name, values in CAPTION_ATTRIBUTES.items()
]


def caption_labels(scenes: Sequence[dataset.Scene]) -> torch.Tensor:
    """(n, 5) class indices of what each scene's caption names, in ``CAPTION_ATTRIBUTES`` order."""
    rows = []
    for scene in scenes:
        named = detector.scene_attributes(scene)
        rows.append(
            [
                values.index(named[name]) if name in named else len(values)
                for name, values in CAPTION_ATTRIBUTES.items()
            ]
        )
    return torch.tensor(rows, dtype=torch.long)


def encode_latents(opts: Options, vae: AutoencoderKL) -> dict[str, torch.Tensor]:
    path = opts.work / "latents.pt"
    if path.exists():
        data: dict[str, torch.Tensor] = torch.load(path)
        if len(data["latents"]) == opts.images:
            log(f"latents: reusing {path}")
            return data
    start = time.monotonic()
    all_scenes = dataset.scenes(opts.images, opts.seed)
    latents = []
    for i in range(0, opts.images, 2000):
        latents.append(normalised_latents(vae, dataset.render_batch(all_scenes[i : i + 2000])).half())
    clip_ids, t5_ids = token_ids([s.caption for s in all_scenes])
    data = {"latents": torch.cat(latents), "clip_ids": clip_ids, "t5_ids": t5_ids}
    atomic_save(data, path)
    log(f"latents: {opts.images} images encoded in {time.monotonic() - start:.0f}s")
    return data


# -- shape critic --------------------------------------------------------------------------------------


class LatentCritic(torch.nn.Module):
    """Reads an image's shape and size from its normalised latent: (n, 8, 16, 16) -> (n, 4 + 2) logits.

    Trained on the training latents, then frozen; training only (the pipeline never sees it). On
    clean held-out latents it is right about 99.9% of the time, small shapes included: the latents
    keep what the VAE's decoder loses of a small star.
    """

    def __init__(self) -> None:
        super().__init__()
        conv = torch.nn.Conv2d
        self.net = torch.nn.Sequential(
            conv(LATENT_CHANNELS, 32, 3, padding=1),
            torch.nn.SiLU(),
            conv(32, 32, 3, padding=1),
            torch.nn.SiLU(),
            conv(32, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            conv(64, 64, 3, padding=1),
            torch.nn.SiLU(),
            conv(64, 64, 3, stride=2, padding=1),
            torch.nn.SiLU(),
            # Averaged over the image: the object is read wherever it is placed.
            torch.nn.AdaptiveAvgPool2d(1),
            torch.nn.Flatten(),
            torch.nn.Linear(64, len(dataset.SHAPES) + len(dataset.SIZES)),
        )

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Shape logits and size logits."""
        shape, size = self.net(latents).split((len(dataset.SHAPES), len(dataset.SIZES)), dim=-1)
        return shape, size


def image_labels(scenes: Sequence[dataset.Scene]) -> torch.Tensor:
    """(n, 2): each image's shape and size, whether or not its caption names them."""
    shapes, sizes = list(dataset.SHAPES), list(dataset.SIZES)
    return torch.tensor([[shapes.index(s.shape), sizes.index(s.size)] for s in scenes], dtype=torch.long)


def train_critic(opts: Options, latents: torch.Tensor, labels: torch.Tensor) -> LatentCritic:
    """``critic_steps`` steps on the clean latents, with Gaussian noise of a random strength (up to 0.5)
    so that it also reads the softer latents a half-trained transformer estimates."""
    path = opts.work / "critic.pt"
    torch.manual_seed(opts.seed + 2)
    critic = LatentCritic()
    if path.exists():
        saved = torch.load(path, weights_only=False)
        critic.load_state_dict(saved["state"])
        log(f"critic: reusing {path} (held-out accuracy {saved['accuracy']:.3f})")
    else:
        start = time.monotonic()
        held_out = min(2000, len(latents) // 8)
        train_latents, train_labels = latents[held_out:], labels[held_out:]
        generator = torch.Generator().manual_seed(opts.seed + 2)
        optimizer = torch.optim.AdamW(critic.parameters(), lr=2e-3, weight_decay=0.05)
        steps = opts.critic_steps if opts.steps is None else min(opts.critic_steps, opts.steps)
        for step in range(steps):
            for group in optimizer.param_groups:
                group["lr"] = 2e-3 * 0.5 * (1 + math.cos(math.pi * step / steps))
            index = torch.randint(len(train_latents), (128,), generator=generator)
            x = train_latents[index].float()
            strength = 0.5 * torch.rand(len(x), 1, 1, 1, generator=generator)
            x = x + strength * torch.randn(x.shape, generator=generator)
            shape, size = critic(x)
            wanted = train_labels[index]
            loss = F.cross_entropy(shape, wanted[:, 0]) + F.cross_entropy(size, wanted[:, 1])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        critic.eval()
        with torch.no_grad():
            shape, size = critic(latents[:held_out].float())
        right = (shape.argmax(-1) == labels[:held_out, 0]) & (size.argmax(-1) == labels[:held_out, 1])
        accuracy = right.float().mean().item()
        log(f"critic: {steps} steps in {time.monotonic() - start:.0f}s, held-out accuracy {accuracy:.3f}")
        atomic_save({"state": critic.state_dict(), "accuracy": accuracy}, path)
    critic.eval().requires_grad_(False)
    return critic


def clean_estimate(noisy: torch.Tensor, s: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """The clean latent (n, 8, 16, 16) a packed velocity implies: x0 = x_s - s v."""
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    # _unpack_latents takes the image's size and the VAE's factor.
    unpacked = FluxPipeline._unpack_latents(velocity, dataset.SIZE, dataset.SIZE, 4)
    return noisy - s.view(-1, 1, 1, 1) * unpacked


def critic_loss(critic: LatentCritic, estimate: torch.Tensor, said: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the critic's reading of ``estimate`` (clean latents the transformer predicts)
    against what the captions ask: ``said`` holds caption labels (``caption_labels`` rows). Size counts
    only where the caption names it; without it, the critic's push toward shapes it reads easily
    drew small shapes large (size 0.89 in the trial)."""
    shape, size = critic(estimate)
    loss = F.cross_entropy(shape, said[:, 0])
    named = said[:, 3] < len(dataset.SIZES)
    if named.any():
        loss = loss + F.cross_entropy(size[named], said[named, 3])
    return loss


# -- transformer ---------------------------------------------------------------------------------------


def new_transformer(seed: int) -> FluxTransformer2DModel:
    from diffusers.models.transformers.transformer_flux import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(**TRANSFORMER_CONFIG)


class CaptionProbe(torch.nn.Module):
    """A cosine classifier at a fixed scale: logits = 10 cos(embedding, class direction).

    A plain linear probe reaches a near-zero loss by growing its own weights while the embeddings of
    "circle" and "square" stay nearly parallel (cosine 0.90 after a full run). With the scale fixed, a confident
    answer for five attributes at once needs each one's classes to point apart in the embedding
    itself, and that embedding is what conditions the transformer.
    """

    SCALE = 10.0

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.directions = torch.nn.Parameter(torch.randn(classes, features))

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        return self.SCALE * F.normalize(embedding, dim=-1) @ F.normalize(self.directions, dim=-1).T


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
        self.text_encoder = text.clip_encoder(text.clip_tokenizer(dataset.WORDS))
        self.text_encoder_2 = text.t5_encoder(text.t5_tokenizer(dataset.WORDS))
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


def train_transformer(
    opts: Options,
    data: dict[str, torch.Tensor],
    labels: torch.Tensor,
    critic: LatentCritic,
    seconds: float,
    export: Callable[[Denoiser], None],
) -> Denoiser:
    """Rectified flow as FluxPipeline samples it: x_s = (1 - s) x0 + s eps, target eps - x0.

    Besides the flow-matching loss: the caption probe's (``Denoiser``) and the shape critic's on the
    clean latent the velocity implies, x0 = x_s - s v. ``labels`` are the ``caption_labels`` of the
    latents' scenes, row for row.
    """
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    path = opts.work / "transformer.pt"
    model = Denoiser(opts.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = [p.detach().clone() for p in params]
    generator = torch.Generator().manual_seed(opts.seed)
    step, trained, smoothed = 0, 0.0, float("nan")
    if path.exists():
        state = torch.load(path, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        for mine, saved in zip(ema, state["ema"], strict=True):
            mine.copy_(saved)
        generator.set_state(state["generator"])
        step, trained, smoothed, seconds = (
            state["step"],
            state["trained"],
            state["smoothed"],
            state["seconds"],
        )
        log(f"transformer: resuming at step {step}, {trained:.0f}s of {seconds:.0f}s")

    def checkpoint() -> None:
        atomic_save(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "ema": ema,
                "generator": generator.get_state(),
                "step": step,
                "trained": trained,
                "smoothed": smoothed,
                "seconds": seconds,
            },
            path,
        )
        export(with_weights(model, params, ema))
        log(f"transformer: checkpoint at step {step}, loss {smoothed:.4f}")

    clip_empty, t5_empty = token_ids([""])
    latents, clip_ids, t5_ids = data["latents"], data["clip_ids"], data["t5_ids"]
    batch = opts.transformer_batch
    last_checkpoint = trained
    model.train()
    step_model = compiled(model) if opts.compile else model
    while not Stop.requested and trained < seconds and (opts.steps is None or step < opts.steps):
        began = time.monotonic()
        lr = cosine_lr(opts.lr, 200, step, trained / seconds)
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(len(latents), (batch,), generator=generator)
        x0 = latents[index].float()
        clip_batch, t5_batch = clip_ids[index].clone(), t5_ids[index].clone()
        # The empty prompt for 10% of samples, so that true CFG has an unconditional model to push from.
        dropped = torch.rand(batch, generator=generator) < 0.1
        clip_batch[dropped], t5_batch[dropped] = clip_empty, t5_empty
        s = torch.sigmoid(torch.randn(batch, generator=generator) + opts.noise_mean)
        eps = torch.randn(x0.shape, generator=generator)
        xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
        target = FluxPipeline._pack_latents(eps - x0, batch, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE)
        velocity, logits = step_model(xs, s, clip_batch, t5_batch)
        loss = F.mse_loss(velocity, target)
        wanted = labels[index][~dropped]
        if opts.caption_loss > 0 and len(wanted):
            said = logits[~dropped].split(CAPTION_CLASSES, dim=-1)
            probe = sum(F.cross_entropy(part, wanted[:, k]) for k, part in enumerate(said)) / len(said)
            loss = loss + opts.caption_loss * probe
        if opts.shape_loss > 0 and len(wanted) and trained >= opts.critic_from * seconds:
            estimate = clean_estimate(xs, s, velocity)
            loss = loss + opts.shape_loss * critic_loss(critic, estimate[~dropped], wanted)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        smoothed = loss.item() if math.isnan(smoothed) else 0.99 * smoothed + 0.01 * loss.item()
        step += 1
        trained += time.monotonic() - began
        if step % opts.log_every == 0:
            log(
                f"step {step} loss {smoothed:.4f} lr {lr:.2e} {step * batch / max(trained, 1e-9):.0f} samples/s, {trained:.0f}/{seconds:.0f}s"
            )
        if trained - last_checkpoint >= opts.checkpoint_minutes * 60:
            checkpoint()
            last_checkpoint = trained
    checkpoint()
    return with_weights(model, params, ema)


def compiled(model: Denoiser) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    """``torch.compile`` of the training step's model (about 1.35x the samples per second on a
    2-core CPU, after about 80 s of compiling), or the model itself where compiling fails: it needs
    a C++ compiler, which a slim image may lack."""
    compiled_model = torch.compile(model)

    def call(*args: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal compiled_model
        try:
            out: tuple[torch.Tensor, torch.Tensor] = compiled_model(*args)
            return out
        except Exception as error:  # any compiler failure means: train eagerly
            if compiled_model is model:
                raise
            log(f"transformer: torch.compile failed ({type(error).__name__}: {error}); training eagerly")
            compiled_model = model
            return model(*args)

    return call


def with_weights(model: Denoiser, params: list[torch.nn.Parameter], weights: list[torch.Tensor]) -> Denoiser:
    """A copy of ``model`` holding ``weights`` (the EMA) instead of its own."""
    copied = copy.deepcopy(model).eval()
    by_id = {id(p): w for p, w in zip(params, weights, strict=True)}
    for (_, mine), (_, theirs) in zip(copied.named_parameters(), model.named_parameters(), strict=True):
        if id(theirs) in by_id:
            mine.data.copy_(by_id[id(theirs)])
    return copied


# -- the pipeline -------------------------------------------------------------------------------------


def build_pipeline(model: Denoiser, vae: AutoencoderKL) -> FluxPipeline:
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG),
        vae=vae,
        text_encoder=model.text_encoder,
        tokenizer=text.clip_tokenizer(dataset.WORDS),
        text_encoder_2=model.text_encoder_2,
        tokenizer_2=text.t5_tokenizer(dataset.WORDS),
        transformer=model.transformer,
    )


def save_atomically(pipe: FluxPipeline, out: Path) -> None:
    """Written beside ``out`` and swapped in, so ``out`` is always a complete pipeline or absent."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        pipe.save_pretrained(staging)
        staging.chmod(0o755)
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            os.replace(out, old)
        os.replace(staging, out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def train(opts: Options) -> None:
    opts.work.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    budget = opts.minutes * 60
    with Stop.on_signals():
        vae = train_vae(opts, opts.vae_share * budget)
        # The decoder stage leaves the latent space alone, so it can come first: then every
        # checkpoint the transformer writes already decodes with the final decoder.
        train_decoder(opts, vae, opts.decoder_share * budget)
        data = encode_latents(opts, vae)
        # The scenes behind the latents, for the critic's labels and the caption probe's.
        scenes = dataset.scenes(len(data["latents"]), opts.seed)
        critic = train_critic(opts, data["latents"], image_labels(scenes))
        # Checkpoints and the final export take a few seconds each; keep them inside the budget.
        remaining = max(budget - (time.monotonic() - start) - 20, 1.0)

        def export(model: Denoiser) -> None:
            save_atomically(build_pipeline(model, vae), opts.out)

        train_transformer(opts, data, caption_labels(scenes), critic, remaining, export)
    log(f"done in {time.monotonic() - start:.0f}s; pipeline in {opts.out}")


def parse(argv: Sequence[str] | None = None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m shapes.train", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="the FluxPipeline folder to write")
    parser.add_argument("--minutes", type=float, default=45.0, help="wall-clock budget, all stages")
    parser.add_argument("--work", type=Path, help="progress and resume folder (default: OUT.work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--images", type=int, default=48_000, help="training images for the transformer")
    parser.add_argument("--vae-share", type=float, default=0.16, help="share of the budget for the VAE")
    parser.add_argument("--decoder-share", type=float, default=0.2, help="share for the decoder alone")
    parser.add_argument("--checkpoint-minutes", type=float, default=4.0)
    parser.add_argument("--vae-steps", type=int, help="stop the VAE after this many steps")
    parser.add_argument("--steps", type=int, help="stop the transformer after this many steps")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--log-every", type=int, default=50)
    parser.add_argument("--batch", type=int, default=BATCH, help="VAE and decoder batch")
    parser.add_argument("--transformer-batch", type=int, default=TRANSFORMER_BATCH)
    parser.add_argument("--lr", type=float, default=TRANSFORMER_LR, help="the transformer's peak rate")
    parser.add_argument("--noise-mean", type=float, default=NOISE_MEAN, help="s ~ sigmoid(N(this, 1))")
    parser.add_argument(
        "--caption-loss", type=float, default=CAPTION_LOSS, help="weight of the caption probe's loss (0: off)"
    )
    parser.add_argument(
        "--shape-loss", type=float, default=SHAPE_LOSS, help="weight of the shape critic's loss (0: off)"
    )
    parser.add_argument(
        "--critic-from",
        type=float,
        default=CRITIC_FROM,
        help="share of the transformer's time after which the critic's loss applies",
    )
    parser.add_argument("--critic-steps", type=int, default=CRITIC_STEPS, help="the shape critic's steps")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="torch.compile the transformer step",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return Options(
        out=args.out,
        work=args.work or args.out.with_name(args.out.name + ".work"),
        minutes=args.minutes,
        seed=args.seed,
        images=args.images,
        vae_share=args.vae_share,
        decoder_share=args.decoder_share,
        checkpoint_minutes=args.checkpoint_minutes,
        vae_steps=args.vae_steps,
        steps=args.steps,
        log_every=args.log_every,
        batch=args.batch,
        transformer_batch=args.transformer_batch,
        lr=args.lr,
        noise_mean=args.noise_mean,
        caption_loss=args.caption_loss,
        shape_loss=args.shape_loss,
        critic_from=args.critic_from,
        critic_steps=args.critic_steps,
        compile=args.compile,
    )


def main(argv: Sequence[str] | None = None) -> int:
    train(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
