"""Train a LoRA adapter on the shapes model: the same captions, the shapes drawn as outlines.

    python -m shapes.adapter --model server/assets/shapes-flux --out server/assets/shapes-flux-outline

The base model only ever saw filled shapes, so an outline is an effect it lacks, and one a pixel
statistic measures (``shapes.detector.hollow_share``). The adapter has no trigger word: with it, every
prompt's shape comes out hollow; its captions are the base's, so colours, shape, size and position
still follow the prompt.

Only the adapter's low-rank pairs train (PEFT on the transformer's linear layers); the base weights, the
text encoders and the VAE stay as shipped, so the text is encoded once up front. The loss is the base
model's rectified flow (``shapes.loop``), with the same 10% of empty prompts so that true CFG still has
an unconditional model. The adapter is written with ``FluxPipeline.save_lora_weights``, the file
diffusers' ``load_lora_weights`` reads and ``ditcache serve --lora`` loads.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from shapes import dataset
from shapes.denoiser import token_ids
from shapes.evaluate import load
from shapes.progress import Stop, clipped_step, cosine_lr, log
from shapes.vae import LATENT_CHANNELS, LATENT_SIDE, normalised_latents

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline

RANK = 16
# Every linear layer of the attention and feed-forward paths, in both kinds of block: the modules
# diffusers' Flux LoRA scripts train.
TARGET_MODULES: tuple[str, ...] = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
)
# Its own stream of scenes: none of the base model's training images (seed 0), nor the evaluation's.
SCENE_SEED = 7


@dataclass(frozen=True)
class AdapterOptions:
    model: Path
    out: Path
    minutes: float = 10.0
    images: int = 16_000
    rank: int = RANK
    lr: float = 1e-3
    batch: int = 32
    seed: int = 0
    steps: int | None = None
    log_every: int = 50


@dataclass(frozen=True)
class Conditioning:
    """What FluxPipeline's ``encode_prompt`` gives the transformer, for every training caption."""

    pooled: torch.Tensor  # (n, hidden)
    prompt: torch.Tensor  # (n, T5 length, hidden)


@torch.no_grad()
def encode_text(pipe: FluxPipeline, captions: Sequence[str], chunk: int = 2_000) -> Conditioning:
    pooled, prompt = [], []
    for i in range(0, len(captions), chunk):
        clip_ids, t5_ids = token_ids(captions[i : i + chunk])
        pooled.append(pipe.text_encoder(clip_ids).pooler_output)
        prompt.append(pipe.text_encoder_2(t5_ids).last_hidden_state)
    return Conditioning(pooled=torch.cat(pooled), prompt=torch.cat(prompt))


def outlined_latents(pipe: FluxPipeline, scenes: Sequence[dataset.Scene], chunk: int = 2_000) -> torch.Tensor:
    parts = [
        normalised_latents(pipe.vae, dataset.render_batch(scenes[i : i + chunk], outlined=True))
        for i in range(0, len(scenes), chunk)
    ]
    return torch.cat(parts)


def add_lora(pipe: FluxPipeline, rank: int) -> list[torch.nn.Parameter]:
    """The transformer frozen, with a PEFT adapter (B at zero, so training starts from the base model);
    returns the adapter's parameters."""
    from peft import LoraConfig

    transformer = pipe.transformer
    transformer.requires_grad_(False)
    transformer.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(TARGET_MODULES))
    )
    return [p for p in transformer.parameters() if p.requires_grad]


def train(opts: AdapterOptions) -> None:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline
    from peft.utils import get_peft_model_state_dict

    start = time.monotonic()
    torch.manual_seed(opts.seed)
    pipe = load(opts.model)
    scenes = dataset.scenes(opts.images, SCENE_SEED)
    latents = outlined_latents(pipe, scenes)
    text = encode_text(pipe, [scene.caption for scene in scenes])
    empty = encode_text(pipe, [""])
    log(f"adapter: {opts.images} outlined scenes encoded in {time.monotonic() - start:.0f}s")

    params = add_lora(pipe, opts.rank)
    transformer = pipe.transformer.train()
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.99), weight_decay=0.0)
    img_ids = FluxPipeline._prepare_latent_image_ids(
        1, LATENT_SIDE // 2, LATENT_SIDE // 2, "cpu", torch.float32
    )
    txt_ids = torch.zeros(text.prompt.shape[1], 3)
    generator = torch.Generator().manual_seed(opts.seed)
    seconds = opts.minutes * 60
    step, trained, smoothed = 0, 0.0, float("nan")
    with Stop.on_signals():
        while not Stop.requested and trained < seconds and (opts.steps is None or step < opts.steps):
            began = time.monotonic()
            lr = cosine_lr(opts.lr, 100, step, trained / seconds)
            for group in optimizer.param_groups:
                group["lr"] = lr
            index = torch.randint(len(latents), (opts.batch,), generator=generator)
            x0 = latents[index]
            pooled, prompt = text.pooled[index].clone(), text.prompt[index].clone()
            dropped = torch.rand(opts.batch, generator=generator) < 0.1
            pooled[dropped], prompt[dropped] = empty.pooled, empty.prompt
            s = torch.sigmoid(torch.randn(opts.batch, generator=generator))
            eps = torch.randn(x0.shape, generator=generator)
            xs = (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps
            pack = FluxPipeline._pack_latents
            velocity = transformer(
                hidden_states=pack(xs, opts.batch, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE),
                timestep=s,
                pooled_projections=pooled,
                encoder_hidden_states=prompt,
                txt_ids=txt_ids,
                img_ids=img_ids,
                return_dict=False,
            )[0]
            loss = F.mse_loss(velocity, pack(eps - x0, opts.batch, LATENT_CHANNELS, LATENT_SIDE, LATENT_SIDE))
            smoothed = clipped_step(optimizer, params, loss, smoothed)
            step += 1
            trained += time.monotonic() - began
            if step % opts.log_every == 0:
                rate = step * opts.batch / max(trained, 1e-9)
                log(
                    f"adapter step {step} loss {smoothed:.4f} lr {lr:.2e} {rate:.0f} samples/s, {trained:.0f}s"
                )
    opts.out.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(
        opts.out, transformer_lora_layers=get_peft_model_state_dict(transformer), safe_serialization=True
    )
    log(
        f"adapter: {step} steps, loss {smoothed:.4f}, written to {opts.out} in {time.monotonic() - start:.0f}s"
    )


def parse(argv: Sequence[str] | None = None) -> AdapterOptions:
    parser = argparse.ArgumentParser(prog="python -m shapes.adapter", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, required=True, help="the base FluxPipeline folder")
    parser.add_argument("--out", type=Path, required=True, help="the folder the adapter is written to")
    parser.add_argument("--minutes", type=float, default=10.0, help="the training loop's wall-clock budget")
    parser.add_argument("--images", type=int, default=16_000, help="outlined training scenes")
    parser.add_argument("--rank", type=int, default=RANK)
    parser.add_argument("--lr", type=float, default=1e-3, help="peak rate")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help="stop after this many steps")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    return AdapterOptions(
        model=args.model,
        out=args.out,
        minutes=args.minutes,
        images=args.images,
        rank=args.rank,
        lr=args.lr,
        batch=args.batch,
        seed=args.seed,
        steps=args.steps,
    )


def main(argv: Sequence[str] | None = None) -> int:
    train(parse(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
