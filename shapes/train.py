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

The stages live in their own modules: ``shapes.vae`` (VAE and decoder), ``shapes.latents``,
``shapes.critic``, ``shapes.loop`` (the transformer, ``shapes.denoiser`` with ``shapes.probe``) and
``shapes.export``; this one runs them in order and holds the command line.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from shapes import dataset
from shapes.critic import image_labels, train_critic
from shapes.denoiser import Denoiser
from shapes.export import build_pipeline, save_atomically
from shapes.latents import encode_latents
from shapes.loop import train_transformer
from shapes.options import (
    BATCH,
    CAPTION_LOSS,
    CRITIC_FROM,
    CRITIC_STEPS,
    NOISE_MEAN,
    SHAPE_LOSS,
    TRANSFORMER_BATCH,
    TRANSFORMER_LR,
    Options,
)
from shapes.probe import caption_labels
from shapes.progress import Stop, log
from shapes.vae import train_decoder, train_vae


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
