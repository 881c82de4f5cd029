"""The shapes model's VAE: its two training stages, and images in and out of its latent space."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from shapes import dataset
from shapes.options import Options
from shapes.progress import Stop, atomic_save, clipped_step, cosine_lr, log
from tiny_pipelines.flux import IMAGE_VAE

if TYPE_CHECKING:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

# The tiny Flux VAE: a 64x64 image is a 16x16x8 latent (three resolutions, so 4x downsampling). Its
# scaling_factor and shift_factor are placeholders; train_vae measures both on the training images.
LATENT_CHANNELS: int = IMAGE_VAE["latent_channels"]
LATENT_SIDE = dataset.SIZE // 4


def new_vae(seed: int) -> AutoencoderKL:
    from diffusers.models.autoencoders.autoencoder_kl import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(**IMAGE_VAE)


def to_pixels(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, h, w, 3) -> float (n, 3, h, w) in [-1, 1], the VAE's input range."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def train_vae(opts: Options, seconds: float) -> AutoencoderKL:
    """The autoencoder, with the latent statistics measured; reused from the work folder if finished."""
    path = opts.work / "vae.pt"
    vae = new_vae(opts.seed)
    if path.exists():
        saved = torch.load(path, weights_only=False)
        vae.load_state_dict(saved["state"])
        vae.register_to_config(**saved["latent_stats"])
        log(f"vae: reusing {path} ({saved['steps']} steps)")
        return vae
    start = time.monotonic()

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample()
            recon = vae.decode(z).sample.float()
        mean, logvar = posterior.mean.float(), posterior.logvar.float()
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar).mean()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x) + 1e-5 * kl

    vae.train()
    rng = np.random.default_rng([opts.seed, 1])
    steps = _fit(opts, "vae", list(vae.parameters()), 2e-3, rng, seconds, loss_of)
    vae.eval()
    stats = latent_stats(
        vae, dataset.render_batch(dataset.scenes(2000 if opts.steps is None else 64, opts.seed + 1))
    )
    vae.register_to_config(**stats)
    psnr = _held_out_psnr(opts, vae)
    log(f"vae: {steps} steps in {time.monotonic() - start:.0f}s, held-out PSNR {psnr:.2f} dB, {stats}")
    atomic_save({"state": vae.state_dict(), "latent_stats": stats, "steps": steps, "psnr": psnr}, path)
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
    start = time.monotonic()

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            with torch.no_grad():
                z = vae.encode(x).latent_dist.sample()
            recon = vae.decode(z).sample.float()
        return F.mse_loss(recon, x) + F.l1_loss(recon, x)

    vae.eval()
    vae.decoder.train()
    rng = np.random.default_rng([opts.seed, 3])
    steps = _fit(opts, "decoder", list(vae.decoder.parameters()), 1e-3, rng, seconds, loss_of)
    vae.eval()
    psnr = _held_out_psnr(opts, vae)
    log(f"decoder: {steps} steps in {time.monotonic() - start:.0f}s, held-out PSNR {psnr:.2f} dB")
    atomic_save({"state": vae.decoder.state_dict(), "steps": steps, "psnr": psnr}, path)
    return vae


def _fit(
    opts: Options,
    name: str,
    params: list[torch.nn.Parameter],
    peak_lr: float,
    rng: np.random.Generator,
    seconds: float,
    loss_of: Callable[[torch.Tensor], torch.Tensor],
) -> int:
    """AdamW on ``params`` over batches of freshly drawn scenes (rendering costs far less than a step)
    until ``seconds`` pass or ``opts.vae_steps`` are done; returns the number of steps.

    The autoencoder stages keep no state mid-way, so a stop request ends the run.
    """
    optimizer = torch.optim.AdamW(params, lr=peak_lr)
    start = time.monotonic()
    step, smoothed = 0, float("nan")
    while not Stop.requested:
        elapsed = time.monotonic() - start
        if elapsed >= seconds or (opts.vae_steps is not None and step >= opts.vae_steps):
            break
        for group in optimizer.param_groups:
            group["lr"] = cosine_lr(peak_lr, 50, step, elapsed / seconds)
        x = to_pixels(dataset.render_batch([dataset.sample_scene(rng) for _ in range(opts.batch)]))
        loss = loss_of(x)
        smoothed = clipped_step(optimizer, params, loss, smoothed)
        step += 1
        if step % opts.log_every == 0:
            log(f"{name} step {step} loss {smoothed:.4f} ({elapsed:.0f}s)")
    if Stop.requested:
        raise SystemExit(f"stopped during the {name} stage, which is not resumable; run again to redo it")
    return step


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


def _held_out_psnr(opts: Options, vae: AutoencoderKL) -> float:
    """PSNR on scenes of a seed of their own (a handful in smoke runs)."""
    scenes = dataset.scenes(500 if opts.steps is None else 16, opts.seed + 2)
    return vae_psnr(vae, dataset.render_batch(scenes))
