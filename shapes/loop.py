"""The transformer stage's training loop: rectified flow with the probe's and the critic's losses,
an EMA of the weights, and a checkpoint every few minutes that the next run resumes from."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from shapes.critic import LatentCritic, critic_loss
from shapes.denoiser import Denoiser, clean_estimate, token_ids
from shapes.options import Options
from shapes.probe import probe_loss
from shapes.progress import Stop, atomic_save, cosine_lr, log
from shapes.vae import LATENT_CHANNELS, LATENT_SIDE


def train_transformer(
    opts: Options,
    data: dict[str, torch.Tensor],
    labels: torch.Tensor,
    critic: LatentCritic,
    seconds: float,
    export: Callable[[Denoiser], None],
) -> Denoiser:
    """Rectified flow as FluxPipeline samples it: x_s = (1 - s) x0 + s eps, target eps - x0.

    Besides the flow-matching loss: the caption probe's (``shapes.probe``) and the shape critic's on the
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
            loss = loss + opts.caption_loss * probe_loss(logits[~dropped], wanted)
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
