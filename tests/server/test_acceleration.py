"""Compiled blocks, quantized weights and attention backends at load, each composed with every cache method.

Compilation is checked with torch.compile's ``eager`` backend: Dynamo traces, splits and guards the
blocks exactly as with inductor, so graph breaks, recompilations and the dispatchers' decisions are
the ones a GPU host gets, and the outputs are bit-identical to the uncompiled model's; inductor's own
C++ build would take minutes here (``python -m benchmarks.engine --compile`` measures it).
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path
from typing import Any, get_args

import numpy as np
import pytest
import torch

from cache_engine import methods
from cache_engine.hooks import undispatched_forward
from cache_engine.targets import build_layout
from server.cli import _parser
from server.models.generation import GenerationParams, generate
from server.models.registry import ModelLoadError, ResidentModel, load_model
from server.ops import acceleration
from server.ops.acceleration import Acceleration, AccelerationError
from server.settings import Settings
from tests.cache_engine.support import small_flux
from tests.server.conftest import LiveServer, generated, live_server

HAS_TORCHAO = importlib.util.find_spec("torchao") is not None
needs_torchao = pytest.mark.skipif(
    not HAS_TORCHAO, reason="torchao is not installed (pip install '.[quantize]')"
)


def _config(method: str) -> Any:
    """A config of ``method`` that plans on every model (the registry's probe for methods without defaults)."""
    cls = methods.CONFIG_CLASSES[method]
    return methods._PROBE_CONFIGS.get(cls, cls)()


def _params(model: ResidentModel, **changes: Any) -> GenerationParams:
    return GenerationParams.from_defaults(
        model.defaults, prompt="a red circle", **{"steps": 4, "seed": 7, **changes}
    )


def _pixels(
    model: ResidentModel, params: GenerationParams, config: object | None = None
) -> tuple[np.ndarray, Any]:
    with model.cache.session(config) as run:
        result = generate(model, params)
    frames = result.images if result.images is not None else (result.videos or [[]])[0]
    return np.stack([np.asarray(frame, dtype=np.float64) for frame in frames]), run.stats


def _psnr(reference: np.ndarray, other: np.ndarray) -> float:
    mse = float(((reference - other) ** 2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(255**2 / mse)


# -- settings and flags ---------------------------------------------------------------------------------


def test_the_settings_offer_each_knob_as_a_flag() -> None:
    args = _parser().parse_args(["serve", "--compile", "--quantize", "int8", "--attention-backend", "native"])
    assert (args.compile, args.quantize, args.attention_backend) == (True, "int8", "native")
    assert get_args(Settings.model_fields["quantize"].annotation) == acceleration.QUANTIZATIONS
    settings = Settings()
    assert (settings.compile, settings.quantize, settings.attention_backend) == (False, "none", None)


# -- attention backends -------------------------------------------------------------------------------


def test_an_unknown_attention_backend_is_refused_with_the_known_ones() -> None:
    with pytest.raises(AccelerationError, match=r"unknown attention backend 'warp'.*native"):
        acceleration.check_attention_backend("warp", device="cpu", dtype=torch.float32)


def test_a_backend_this_machine_cannot_run_stops_the_load(model_cache: Path) -> None:
    # flash-attn needs a CUDA GPU and its package; neither is here.
    with pytest.raises(ModelLoadError, match="attention backend 'flash' cannot run on cpu"):
        load_model("tiny-flux", cache_dir=model_cache, accelerate=Acceleration(attention_backend="flash"))


def test_the_native_backend_serves_what_the_default_serves(model_cache: Path) -> None:
    plain = load_model("tiny-flux", cache_dir=model_cache)
    native = load_model(
        "tiny-flux", cache_dir=model_cache, accelerate=Acceleration(attention_backend="native")
    )
    params = _params(plain)
    assert np.array_equal(_pixels(plain, params)[0], _pixels(native, params)[0])


# -- quantization ---------------------------------------------------------------------------------------


def test_fp8_needs_a_gpu_that_has_it(model_cache: Path) -> None:
    with pytest.raises(ModelLoadError, match="fp8 needs a CUDA device"):
        load_model("tiny-flux", cache_dir=model_cache, accelerate=Acceleration(quantize="fp8"))


@needs_torchao
def test_int8_weights_take_under_a_third_and_every_method_still_runs(model_cache: Path) -> None:
    plain = load_model("tiny-flux", cache_dir=model_cache)
    quantized = load_model("tiny-flux", cache_dir=model_cache, accelerate=Acceleration(quantize="int8"))
    assert quantized.weight_bytes <= 0.3 * plain.weight_bytes
    bf16 = load_model("tiny-flux", cache_dir=model_cache, dtype="bfloat16")
    bf16_int8 = load_model(
        "tiny-flux", cache_dir=model_cache, dtype="bfloat16", accelerate=Acceleration(quantize="int8")
    )
    assert bf16_int8.weight_bytes <= 0.55 * bf16.weight_bytes
    params = _params(plain)
    reference, _ = _pixels(plain, params)
    uncached, _ = _pixels(quantized, params)
    assert _psnr(reference, uncached) > 40
    for method in quantized.supported_methods:
        output, stats = _pixels(quantized, params, _config(method))
        assert stats.method == method and output.shape == reference.shape


# -- compiled blocks ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def compiled_server(model_cache: Path) -> Any:
    """A server started with --compile serving tiny-flux; Dynamo runs with the eager backend."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(
            "server.runtime.loading.Acceleration", functools.partial(Acceleration, compile_backend="eager")
        )
        yield from live_server(model_cache, models=["tiny-flux"], compile=True)


@pytest.fixture(scope="module")
def compiled_pair(model_cache: Path, compiled_server: LiveServer) -> tuple[ResidentModel, ResidentModel]:
    """tiny-flux eager, and the compiled one the server warmed up before it was ready."""
    generations = compiled_server.runtime.generations
    assert generations is not None
    return load_model("tiny-flux", cache_dir=model_cache), generations.resolve_model("tiny-flux")


def test_the_server_compiled_before_it_was_ready(compiled_server: LiveServer) -> None:
    with compiled_server.client() as client:
        metrics = client.get("/metrics").text
    (line,) = [line for line in metrics.splitlines() if line.startswith("ditcache_compile_seconds{")]
    assert float(line.split()[-1]) > 0


def test_every_dispatcher_inside_a_compiled_block_is_sealed(
    compiled_pair: tuple[ResidentModel, ResidentModel],
) -> None:
    _, compiled = compiled_pair
    engine = compiled.cache.engines[0]
    assert all(acceleration.is_compiled(site.module) for site in engine.layout.blocks)
    # And each block is offered compiled whole, for the policies that act on nothing inside it.
    assert all(undispatched_forward(site.module) is not None for site in engine.layout.blocks)
    assert acceleration.seal(compiled.pipeline.transformer) == 0  # already done at load


def _compiled_regions(model: ResidentModel, config: object | None) -> tuple[int, int]:
    """(compiled regions entered, blocks computed) in one generation under ``config``."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        _, stats = _pixels(model, _params(model), config)
    regions = sum(event.name.startswith("Torch-Compiled Region") for event in profile.events())
    return regions, stats.blocks_computed


def test_a_policy_deciding_ahead_of_a_block_runs_it_as_one_graph(
    compiled_pair: tuple[ResidentModel, ResidentModel],
) -> None:
    _, compiled = compiled_pair
    # Acting on nothing inside the block, or on its attention through handlers that decide before it.
    for method in ("none", "first_block_cache", "pyramid_attention_broadcast", "taylorseer"):
        regions, blocks = _compiled_regions(compiled, None if method == "none" else _config(method))
        assert regions == blocks > 0, method
    # FasterCache's attention handler reads the call's batch: each block runs in pieces around it.
    regions, blocks = _compiled_regions(compiled, _config("faster_cache"))
    assert regions > blocks > 0


def test_a_block_with_a_forward_set_inside_it_is_not_offered_whole() -> None:
    # A wrapper bound to a real module (an offload hook) would be called from the block's copy too.
    transformer = small_flux(double_blocks=2, single_blocks=1)
    layout = build_layout(transformer)
    hooked = next(site.module for site in layout.attention if site.name == "transformer_blocks.0.attn")
    hooked.forward = functools.partial(type(hooked).forward, hooked)
    acceleration.compile_blocks(
        [site.module for site in layout.blocks], [site.module for site in layout.attention], backend="eager"
    )
    offered = {site.name: undispatched_forward(site.module) is not None for site in layout.blocks}
    assert offered == {
        "transformer_blocks.0": False,
        "transformer_blocks.1": True,
        "single_transformer_blocks.0": True,
    }
    assert all(acceleration.is_compiled(site.module) for site in layout.blocks)


def test_compiled_blocks_compose_with_every_method_across_sizes_without_recompiling(
    compiled_pair: tuple[ResidentModel, ResidentModel],
) -> None:
    eager, compiled = compiled_pair
    before = acceleration.compiled_frames()
    step = compiled.size_multiple
    base = compiled.defaults
    sizes = [(base.width + 2 * step, base.height - step), (base.width - step, base.height + 3 * step)]
    for width, height in sizes:
        params = _params(compiled, width=width, height=height)
        for method in ("none", *compiled.supported_methods):
            config = None if method == "none" else _config(method)
            expected, expected_stats = _pixels(eager, params, config)
            output, stats = _pixels(compiled, params, config)
            # Same decisions, same counts, same bits: the dispatchers ran outside the graphs.
            assert stats == expected_stats, method
            assert np.array_equal(output, expected), method
    assert acceleration.compiled_frames() == before


# -- over HTTP --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def int8_server(model_cache: Path) -> Any:
    if not HAS_TORCHAO:
        pytest.skip("torchao is not installed")
    yield from live_server(model_cache, models=["tiny-flux"], quantize="int8")


@needs_torchao
def test_the_model_card_and_the_answer_show_weights_and_cache_memory(int8_server: LiveServer) -> None:
    with int8_server.client() as client:
        card = client.get("/v1/models").json()["data"][0]
        body = {"model": "tiny-flux", "prompt": "a red circle", "steps": 4}
        answer = generated(client, {**body, "cache": {"method": "first_block_cache", "threshold": 0.5}})
        metrics = client.get("/metrics").text
    assert 0 < card["weight_bytes"] < 1_000_000  # tiny-flux: 2.4 MB in float32
    assert answer["cache"]["peak_bytes"] > 0
    assert 'ditcache_cache_peak_bytes_max{method="first_block_cache",model="tiny-flux"}' in metrics
