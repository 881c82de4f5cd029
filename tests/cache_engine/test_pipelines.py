"""The engine tests' tiny pipelines: every family runs, is deterministic, matches ``FAMILY_INFO``, is the
tiny-pipeline factory's own without text encoders, and can be cloned around a shared transformer."""

from __future__ import annotations

import contextlib
import inspect
import itertools
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch

from tests.cache_engine.pipelines import (
    CALLS,
    CFG_MODES,
    FAMILIES,
    FAMILY_INFO,
    NUM_INFERENCE_STEPS,
    OTHER_FAMILIES,
    TinyPipeline,
    build,
    clone_with_shared_transformer,
    run,
)
from tiny_pipelines import tiny_pipeline


@pytest.fixture(autouse=True)
def one_intra_op_thread() -> Iterator[None]:
    """Run with a single intra-op thread, as the factory's sizes assume.

    The tiny models' tensors are far too small for intra-op parallelism to pay, and on a shared
    2-core machine OpenMP's waiting threads made a run 10-40x slower (30-80 ms became 0.3-3 s).
    Threads started inside a test inherit the setting, so the concurrency test is covered too.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


CASES = [(family, cfg) for family in FAMILIES for cfg in FAMILY_INFO[family].cfg_modes]

# Size of every axis of the transformer output, batch aside (it depends on the CFG mode).
OUTPUT_AXES: dict[str, dict[str, int]] = {
    "flux": {"S": 64, "C": 32},
    "cogvideox": {"F": 3, "C": 8, "H": 8, "W": 8},
    "wan": {"C": 8, "F": 3, "H": 8, "W": 8},
    "hunyuan_video": {"C": 8, "F": 3, "H": 8, "W": 8},
    "ltx": {"S": 192, "C": 8},
    "sd3": {"C": 16, "H": 16, "W": 16},
    "cogview4": {"C": 8, "H": 16, "W": 16},
    # Noise prediction and learned variance, concatenated on channels.
    "pixart": {"C": 8, "H": 16, "W": 16},
}


@dataclass
class Trace:
    """What the transformer saw and returned during one run."""

    timesteps: list[float] = field(default_factory=list)
    positional: list[tuple[str, ...]] = field(default_factory=list)
    outputs: list[torch.Tensor] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)


def traced_run(tp: TinyPipeline) -> tuple[torch.Tensor, Trace]:
    transformer = tp.pipe.transformer
    trace = Trace()
    params = list(inspect.signature(transformer.forward).parameters)

    def before(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        trace.positional.append(tuple(params[: len(args)]))
        timestep = kwargs["timestep"]
        trace.timesteps.append(float(timestep.flatten()[0]))

    def after(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        trace.outputs.append(output[0].detach().clone())

    handles = [
        transformer.register_forward_pre_hook(before, with_kwargs=True),
        transformer.register_forward_hook(after, with_kwargs=True),
    ]
    patched = hasattr(transformer, "cache_context")
    if patched:
        original = transformer.cache_context

        @contextlib.contextmanager
        def recording(name: str, **kwargs: Any) -> Iterator[None]:
            trace.contexts.append(name)
            with original(name, **kwargs):
                yield

        # An instance attribute shadows the class's method for this one pipeline only.
        transformer.cache_context = recording
    try:
        latents = run(tp)
    finally:
        for handle in handles:
            handle.remove()
        if patched:
            del transformer.cache_context
    return latents, trace


def test_family_table_is_complete() -> None:
    assert set(FAMILY_INFO) == {*FAMILIES, *OTHER_FAMILIES}
    for info in FAMILY_INFO.values():
        assert set(info.cfg_modes) <= set(CFG_MODES)
        assert set(info.cache_contexts) == set(info.cfg_modes)


@pytest.mark.parametrize(("family", "cfg"), CASES)
def test_builds_and_denoises(family: str, cfg: str) -> None:
    info = FAMILY_INFO[family]
    tp = build(family, cfg=cfg)
    assert (tp.family, tp.cfg) == (family, cfg)
    assert type(tp.pipe).__name__ == info.pipeline_class
    assert type(tp.pipe.transformer).__name__ == info.transformer_class
    assert "generator" not in tp.call_kwargs
    assert all(p.dtype == torch.float32 for p in tp.pipe.transformer.parameters())
    assert not tp.pipe.transformer.training
    # Prompt embeddings come in directly: no text encoder or tokenizer was kept.
    assert {name for name, c in tp.pipe.components.items() if c is not None} == {
        "transformer",
        "vae",
        "scheduler",
    }

    latents, trace = traced_run(tp)

    assert latents.dtype == torch.float32
    assert torch.isfinite(latents).all()
    branches = 2 if cfg == "separate" else 1
    assert len(trace.outputs) == NUM_INFERENCE_STEPS * branches
    assert trace.contexts == list(info.cache_contexts[cfg]) * NUM_INFERENCE_STEPS
    assert hasattr(tp.pipe.transformer, "cache_context") == bool(info.cache_contexts[cfg])
    assert all(names == info.transformer_positional for names in trace.positional)

    batch = 2 if cfg == "batched" else 1
    axes = OUTPUT_AXES[family]
    expected_shape = tuple(batch if axis == "B" else axes[axis] for axis in info.output_layout)
    assert all(out.shape == expected_shape for out in trace.outputs)

    # The first step is at the top of the schedule, in the units the family's transformer expects,
    # and time runs down from there.
    steps = trace.timesteps[::branches]
    assert 0.99 * info.timestep_scale <= steps[0] <= info.timestep_scale
    assert all(a > b for a, b in itertools.pairwise(steps))

    # The prediction is substantial and moves from step to step, so caching has something to
    # approximate and an approximation shows up in the result.
    for branch in range(branches):
        outs = trace.outputs[branch::branches]
        assert all(out.std() > 0.1 for out in outs)
        for prev, cur in itertools.pairwise(outs):
            assert (cur - prev).abs().mean() > 0.01 * prev.abs().mean()


@pytest.mark.parametrize("family", FAMILIES)
def test_module_names_match_table(family: str) -> None:
    info = FAMILY_INFO[family]
    transformer = build(family).pipe.transformer
    assert transformer.config.num_attention_heads >= 2

    total = 0
    covered: set[str] = set()
    for list_name in info.block_lists:
        blocks = transformer.get_submodule(list_name)
        assert isinstance(blocks, torch.nn.ModuleList)
        assert len(blocks) >= 2
        total += len(blocks)
        for pattern in info.attention_modules:
            if not pattern.startswith(list_name + "."):
                continue
            for i in range(len(blocks)):
                name = pattern.format(i=i)
                assert hasattr(transformer.get_submodule(name), "processor"), name
                covered.add(name)
    assert total >= 4

    # Every attention module inside the denoising blocks is named by the table.
    inside_blocks = {
        name
        for name, module in transformer.named_modules()
        if hasattr(module, "processor") and name.split(".")[0] in info.block_lists
    }
    assert inside_blocks == covered


@pytest.mark.parametrize("family", FAMILIES)
def test_block_calls_match_table(family: str) -> None:
    info = FAMILY_INFO[family]
    tp = build(family)
    seen: dict[str, tuple[bool, tuple[str, ...]]] = {}

    def hook_for(list_name: str, block: torch.nn.Module) -> Any:
        signature = inspect.signature(block.forward)

        def hook(_: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
            if list_name in seen:
                return
            bound = signature.bind(*args, **kwargs).arguments
            shapes = {
                bound["hidden_states"].shape: "hidden_states",
                bound["encoder_hidden_states"].shape: "encoder_hidden_states",
            }
            outputs = output if isinstance(output, tuple) else (output,)
            seen[list_name] = (bool(args), tuple(shapes[out.shape] for out in outputs))

        return hook

    handles = []
    for list_name in info.block_lists:
        block = tp.pipe.transformer.get_submodule(list_name)[0]
        handles.append(block.register_forward_hook(hook_for(list_name, block), with_kwargs=True))
    try:
        run(tp)
    finally:
        for handle in handles:
            handle.remove()

    assert seen == {name: (info.blocks_positional, info.block_outputs) for name in info.block_lists}


@pytest.mark.parametrize("family", FAMILIES)
def test_deterministic(family: str) -> None:
    tp = build(family)
    first = run(tp, seed=0)
    assert torch.equal(run(tp, seed=0), first)
    assert torch.equal(run(build(family), seed=0), first)
    assert not torch.allclose(run(tp, seed=1), first)
    assert not torch.allclose(run(build(family, seed=1), seed=0), first)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_transformer_is_the_factorys_own(family: str) -> None:
    """Leaving the text encoders out changes nothing else: the full factory pipeline has the same weights."""
    full = tiny_pipeline(CALLS[family].tiny).build(0)
    assert full.text_encoder is not None
    pipe = build(family).pipe
    for component in ("transformer", "vae"):
        ours = getattr(pipe, component).state_dict()
        theirs = getattr(full, component).state_dict()
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[key], theirs[key]) for key in ours), component


def test_overrides_reshape_one_component_and_leave_the_others_alone() -> None:
    factory = tiny_pipeline("wan")
    plain = factory.build(0, text_encoders=False)
    shallow = factory.build(0, overrides={"transformer": {"num_layers": 2}}, text_encoders=False)
    assert len(shallow.transformer.blocks) == 2 < len(plain.transformer.blocks)
    assert shallow.transformer.config.attention_head_dim == plain.transformer.config.attention_head_dim
    vae, plain_vae = shallow.vae.state_dict(), plain.vae.state_dict()
    assert all(torch.equal(vae[key], plain_vae[key]) for key in plain_vae)
    # The recipe itself is left as it was.
    assert factory.recipe["transformer"]["num_layers"] == len(plain.transformer.blocks)
    with pytest.raises(KeyError, match="transfomer"):
        factory.build(0, overrides={"transfomer": {"num_layers": 2}})


def test_build_leaves_global_rng_alone() -> None:
    torch.manual_seed(1234)
    expected = torch.rand(4)
    torch.manual_seed(1234)
    build("wan")
    assert torch.equal(torch.rand(4), expected)


def test_unknown_family_or_mode_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown family"):
        build("unet")
    with pytest.raises(ValueError, match="cfg modes"):
        build("flux", cfg="batched")


@pytest.mark.parametrize(("family", "cfg"), CASES)
def test_clone_shares_only_the_transformer(family: str, cfg: str) -> None:
    tp = build(family, cfg=cfg)
    clone = clone_with_shared_transformer(tp)
    assert clone.pipe.transformer is tp.pipe.transformer
    assert clone.pipe.scheduler is not tp.pipe.scheduler
    assert clone.pipe.vae is not tp.pipe.vae
    assert type(clone.pipe) is type(tp.pipe)
    assert (clone.family, clone.cfg) == (tp.family, tp.cfg)

    reference = run(tp)
    assert torch.equal(run(clone), reference)
    assert torch.equal(run(tp), reference)


@pytest.mark.parametrize("family", FAMILIES)
def test_clones_run_concurrently(family: str) -> None:
    tp = build(family)
    clone = clone_with_shared_transformer(tp)
    expected = {0: run(tp, seed=0), 1: run(tp, seed=1)}
    # One pipeline object must never run twice at once (its scheduler holds the step state), so
    # each round runs the original and the clone side by side and waits for both.
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(2):
            original = pool.submit(run, tp, seed=0)
            cloned = pool.submit(run, clone, seed=1)
            assert torch.equal(original.result(), expected[0])
            assert torch.equal(cloned.result(), expected[1])
