"""Every tiny pipeline family served from its own folder, through the real HTTP stack.

Each family is written by ``save_pretrained`` into a folder and served as ``ditcache serve --model
<folder>`` would: one server holds them all. Per family: the media has the asked shape and its stages
are timed; the uncached media is what a direct call of the same diffusers pipeline gives (the expected
call arguments are spelt out in ``FAMILIES``, not taken from the server); guidance and the negative
prompt act where the family takes them and are refused where it does not; a cancelled job stops
within one step; every cache method the model lists reuses something.
"""

from __future__ import annotations

import io
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image, ImageSequence

from server.models import media
from server.models.registry import ModelLoadError, load_model, own_memory
from tiny_pipelines import IMAGE_TO_VIDEO_NAMES, TINY_PIPELINE_NAMES, tiny_pipeline

from .conftest import LiveServer, b64_items, error_of, one_thread_server


@dataclass(frozen=True)
class Family:
    """How a direct diffusers call of one family looks, written out here independently of the server."""

    # The tiny_pipelines entry the folder is built from.
    tiny: str
    pipeline_class: str
    # The __call__ argument that receives the request's guidance_scale; None: the model takes none.
    guidance_argument: str | None
    negative_prompt: bool
    # The __call__ argument that receives the request's fps; elsewhere fps only sets the container rate.
    fps_argument: str | None = None
    fixed_arguments: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))
    # Wan 2.2 needs 4 steps for its low-noise expert (transformer_2) to get any; LTX needs at least 2.
    steps: int = 2
    # Extra constructor arguments on top of the tiny pipeline's components (a variant of its class).
    variant: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def video(self) -> bool:
        return "num_frames" in tiny_pipeline(self.tiny).small_call


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        # The tiny Flux has no guidance embedding (schnell-like): guidance is true CFG.
        "flux": Family("flux", "FluxPipeline", "true_cfg_scale", negative_prompt=True),
        # Undistilled Klein: CFG against the empty prompt, no negative prompt text.
        "flux2": Family("flux2", "Flux2KleinPipeline", "guidance_scale", negative_prompt=False),
        # Step-distilled Klein ignores guidance: the only family here that takes none.
        "flux2_distilled": Family(
            "flux2",
            "Flux2KleinPipeline",
            None,
            negative_prompt=False,
            variant=MappingProxyType({"is_distilled": True}),
        ),
        "qwenimage": Family("qwenimage", "QwenImagePipeline", "true_cfg_scale", negative_prompt=True),
        "sd3": Family("sd3", "StableDiffusion3Pipeline", "guidance_scale", negative_prompt=True),
        "cogview4": Family("cogview4", "CogView4Pipeline", "guidance_scale", negative_prompt=True),
        # Binning would compute the request at a trained bin and resize: the server turns it off.
        "pixart_sigma": Family(
            "pixart_sigma",
            "PixArtSigmaPipeline",
            "guidance_scale",
            negative_prompt=True,
            fixed_arguments=MappingProxyType({"use_resolution_binning": False}),
        ),
        "cogvideox": Family("cogvideox", "CogVideoXPipeline", "guidance_scale", negative_prompt=True),
        "wan": Family("wan", "WanPipeline", "guidance_scale", negative_prompt=True),
        "wan22": Family("wan22", "WanPipeline", "guidance_scale", negative_prompt=True, steps=4),
        # Wan 2.2 TI2V 5B: one transformer on a 48-channel VAE, given one timestep per token.
        "wan22_5b": Family("wan22_5b", "WanPipeline", "guidance_scale", negative_prompt=True),
        # Embedded guidance; a negative prompt would need true CFG on top, which a request cannot ask for.
        "hunyuan_video": Family(
            "hunyuan_video", "HunyuanVideoPipeline", "guidance_scale", negative_prompt=False
        ),
        "ltx": Family(
            "ltx", "LTXPipeline", "guidance_scale", negative_prompt=True, fps_argument="frame_rate"
        ),
        "z_image": Family("z_image", "ZImagePipeline", "guidance_scale", negative_prompt=True),
        "lumina2": Family("lumina2", "Lumina2Pipeline", "guidance_scale", negative_prompt=True),
        "sana": Family(
            "sana",
            "SanaPipeline",
            "guidance_scale",
            negative_prompt=True,
            fixed_arguments=MappingProxyType({"use_resolution_binning": False}),
        ),
        "chroma": Family("chroma", "ChromaPipeline", "guidance_scale", negative_prompt=True),
        "aura_flow": Family("aura_flow", "AuraFlowPipeline", "guidance_scale", negative_prompt=True),
        "cogview3plus": Family(
            "cogview3plus", "CogView3PlusPipeline", "guidance_scale", negative_prompt=True, steps=4
        ),
        "skyreels_v2": Family("skyreels_v2", "SkyReelsV2Pipeline", "guidance_scale", negative_prompt=True),
        # One step divides by zero in its sigma schedule.
        "mochi": Family("mochi", "MochiPipeline", "guidance_scale", negative_prompt=True),
        "hidream": Family("hidream", "HiDreamImagePipeline", "guidance_scale", negative_prompt=True),
        # Guidance is the guider component's: a request's guidance_scale has nowhere to go.
        "hunyuan_video15": Family("hunyuan_video15", "HunyuanVideo15Pipeline", None, negative_prompt=True),
        "ltx2": Family(
            "ltx2", "LTX2Pipeline", "guidance_scale", negative_prompt=True, fps_argument="frame_rate"
        ),
    }
)
NAMES = tuple(FAMILIES)

PROMPT = "a red cat walking in the snow"
NEGATIVE = "dark, blurry"
SEED = 7
# Above 1 so that every CFG family (true CFG included) runs its unconditional branch.
GUIDANCE = 3.0
OTHER_GUIDANCE = 6.0
# Not LTX's default (25), so that a pipeline left at its default frame rate shows.
FPS = 12
OTHER_FPS = 30
# Animated WebP: mp4 needs ffmpeg to read back, and GIF quantises to 256 colours.
VIDEO_FORMAT = "webp"
# Settings that must reuse something within a family's few steps, whatever the weights.
POLICIES: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "pyramid_attention_broadcast": {
            "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": [-1, 1001],
        },
        "faster_cache": {
            "spatial_attention_block_skip_range": 2,
            "spatial_attention_timestep_skip_range": [-1, 1001],
            "unconditional_batch_skip_range": 2,
            "unconditional_batch_timestep_skip_range": [-1, 1001],
        },
        "first_block_cache": {"threshold": 10.0},
        "taylorseer": {"cache_interval": 2, "disable_cache_before_step": 1},
        # The tiny models have no calibrated magnitude ratios: flat ones, given with the request.
        "mag_cache": {"threshold": 10.0, "retention_ratio": 0.0, "mag_ratios": [1.0] * 8},
        "sea_cache": {"threshold": 10.0, "retention_steps": 0, "cache_end_steps": 0},
        "dbcache": {
            "Fn_compute_blocks": 1,
            "Bn_compute_blocks": 0,
            "residual_diff_threshold": 10.0,
            "max_warmup_steps": 0,
        },
        # Most families have no published coefficients: the identity polynomial, given with the request.
        # TeaCache always computes a run's first and last steps, and these requests have two: num_steps
        # set past them leaves the second free to be reused.
        "teacache": {"rel_l1_thresh": 10.0, "coefficients": [1.0, 0.0], "num_steps": 8},
        # Its first check needs two full steps at order 0: it predicts from the third (see GUARDED_STEPS).
        "guarded_taylorseer": {"step_tolerance": 10.0, "max_order": 0, "disable_cache_before_step": 2},
    }
)
# Guarded TaylorSeer checks before it predicts, so it needs more steps than a family's smallest request.
GUARDED_STEPS = 4


# Server bugs found by this module, keyed (family, cache method).
def test_the_table_covers_every_tiny_pipeline() -> None:
    # Those that need an image are served by test_http_image_to_video.
    text_pipelines = set(TINY_PIPELINE_NAMES) - set(IMAGE_TO_VIDEO_NAMES)
    assert {family.tiny for family in FAMILIES.values()} == text_pipelines


# -- fixtures ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """Each family's pipeline written once by save_pretrained, into a folder named after the family."""
    root = tmp_path_factory.mktemp("families")
    written: dict[str, Path] = {}
    for name, family in FAMILIES.items():
        pipeline = tiny_pipeline(family.tiny).build()
        if family.variant:
            pipeline = type(pipeline)(**pipeline.components, **family.variant)
        pipeline.save_pretrained(root / name)
        written[name] = root / name
    return MappingProxyType(written)


@pytest.fixture(scope="module")
def server(model_cache: Path, folders: Mapping[str, Path]) -> Iterator[LiveServer]:
    yield from one_thread_server(model_cache, models=[str(folder) for folder in folders.values()])


@dataclass
class Reference:
    """A direct call's output, and how many times it called each of its transformers."""

    pixels: np.ndarray
    denoiser_calls: dict[str, int]


class References:
    """Direct diffusers calls of each family, each pipeline loaded from its folder once."""

    def __init__(self, folders: Mapping[str, Path]) -> None:
        self.folders = folders
        self._made: dict[str, Reference] = {}

    def __getitem__(self, name: str) -> Reference:
        if name not in self._made:
            self._made[name] = self._call(name)
        return self._made[name]

    def _call(self, name: str) -> Reference:
        from diffusers import DiffusionPipeline

        family = FAMILIES[name]
        pipeline = DiffusionPipeline.from_pretrained(self.folders[name], local_files_only=True)
        # As the server does with the models it loads: CPU kernels round the last bit differently on the
        # memory-mapped checkpoint's unaligned weights, and a lossy encoding can make that a pixel.
        own_memory(pipeline)
        pipeline.set_progress_bar_config(disable=True)
        assert type(pipeline).__name__ == family.pipeline_class
        calls: dict[str, int] = {}
        for component, module in pipeline.components.items():
            if component.startswith("transformer") and isinstance(module, torch.nn.Module):
                calls[component] = 0
                module.register_forward_pre_hook(lambda *_, component=component: _count(calls, component))
        # The server fixture set the process to one thread: the direct call sums in the server's order.
        assert torch.get_num_threads() == 1
        output = pipeline(**expected_call(family, body(name)))
        if family.video:
            frames = output.frames[0]
            # No video format the server writes is lossless, so the direct call's frames go through the
            # server's own deterministic encoder: equal frames give equal files, and the decoded pixels
            # are then compared exactly (a changed pixel almost always changes the lossy encoding too).
            pixels = decode_pixels(media.encode_video(frames, VIDEO_FORMAT, FPS))
        else:
            pixels = np.asarray(output.images[0].convert("RGB"))
        return Reference(pixels=pixels, denoiser_calls=calls)


def _count(calls: dict[str, int], component: str) -> None:
    calls[component] += 1


@pytest.fixture(scope="module")
def references(server: LiveServer, folders: Mapping[str, Path]) -> References:
    # After the server: its torch_threads=1 is in effect for the direct calls, and restored after them.
    return References(folders)


# -- requests -------------------------------------------------------------------------------------------


def body(name: str, **overrides: Any) -> dict[str, Any]:
    """The family's smallest request; guidance only where the family takes it."""
    family = FAMILIES[name]
    request: dict[str, Any] = {
        "model": name,
        "prompt": PROMPT,
        "seed": SEED,
        "steps": family.steps,
        **tiny_pipeline(family.tiny).small_call,
    }
    if family.guidance_argument is not None:
        request["guidance_scale"] = GUIDANCE
    if family.video:
        request["output_format"] = VIDEO_FORMAT
        request["fps"] = FPS
    request.update(overrides)
    return request


def expected_call(family: Family, request: Mapping[str, Any]) -> dict[str, Any]:
    """The direct diffusers call that a request for ``family`` should amount to."""
    kwargs: dict[str, Any] = {
        "prompt": request["prompt"],
        "width": request["width"],
        "height": request["height"],
        "num_inference_steps": request["steps"],
        "generator": torch.Generator("cpu").manual_seed(request["seed"]),
        "output_type": "pil",
    }
    if family.video:
        kwargs["num_frames"] = request["num_frames"]
    negative = request.get("negative_prompt")
    if family.guidance_argument is not None:
        kwargs[family.guidance_argument] = request["guidance_scale"]
        # True CFG runs only against a negative prompt: without one, the empty prompt is the
        # unconditional branch, as classifier-free guidance has it everywhere else.
        if (
            family.guidance_argument == "true_cfg_scale"
            and negative is None
            and request["guidance_scale"] > 1
        ):
            negative = ""
    if negative is not None:
        kwargs["negative_prompt"] = negative
    if family.fps_argument is not None:
        kwargs[family.fps_argument] = request["fps"]
    kwargs.update(family.fixed_arguments)
    return kwargs


def generate(client: httpx.Client, request: Mapping[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/generations", json=request)
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


class Plain:
    """The answer to each family's plain request (``body(name)``), asked once: the server is deterministic,
    so the tests that compare against it share one request instead of repeating it."""

    def __init__(self, client: httpx.Client) -> None:
        self.client = client
        self._answers: dict[str, dict[str, Any]] = {}

    def __getitem__(self, name: str) -> dict[str, Any]:
        if name not in self._answers:
            self._answers[name] = generate(self.client, body(name))
        return self._answers[name]


@pytest.fixture(scope="module")
def plain(client: httpx.Client) -> Plain:
    return Plain(client)


def decode_pixels(data: bytes) -> np.ndarray:
    """An image as (height, width, 3), a video as (frames, height, width, 3), in RGB."""
    with Image.open(io.BytesIO(data)) as image:
        frames = [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]
        animated = getattr(image, "is_animated", False)
    return np.stack(frames) if animated or len(frames) > 1 else frames[0]


def pixels_of(result: Mapping[str, Any]) -> np.ndarray:
    (item,) = b64_items(dict(result))
    return decode_pixels(item)


# -- the models -----------------------------------------------------------------------------------------


def test_each_folder_is_a_model_named_after_it(client: httpx.Client, folders: Mapping[str, Path]) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert set(cards) == set(FAMILIES)
    for name, card in cards.items():
        assert card["source"] == f"local:{folders[name]}"
        assert card["kind"] == ("video" if FAMILIES[name].video else "image")
        # Every method listed gets a policy in test_each_cache_method_reuses.
        assert set(card["cache_methods"]) <= {"none", *POLICIES}, name


# -- 1 and 2: shape, timings, and the direct call ---------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_media_has_the_asked_shape_and_timed_stages(plain: Plain, name: str) -> None:
    request = body(name)
    result = plain[name]
    (item,) = b64_items(result)
    if FAMILIES[name].video:
        assert result["media_type"] == "image/webp"
        with Image.open(io.BytesIO(item)) as video:
            assert video.size == (request["width"], request["height"])
            assert getattr(video, "n_frames", 1) == request["num_frames"]
    else:
        with Image.open(io.BytesIO(item)) as image:
            assert image.format == "PNG"
            assert image.size == (request["width"], request["height"])
    timings = result["timings"]
    for stage in ("text_encoding", "denoising", "decoding"):
        assert timings.get(stage, 0) > 0, (stage, timings)
    assert len(timings["denoising_steps"]) == request["steps"]
    assert all(step > 0 for step in timings["denoising_steps"])


@pytest.mark.parametrize("name", NAMES)
def test_uncached_media_equals_a_direct_call_of_the_pipeline(
    plain: Plain, references: References, name: str
) -> None:
    served = pixels_of(plain[name])
    expected = references[name].pixels
    assert served.shape == expected.shape
    np.testing.assert_array_equal(served, expected)


# -- 3: guidance, negative prompt, frame rate -------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_guidance_acts_where_taken_and_is_refused_elsewhere(
    client: httpx.Client, plain: Plain, name: str
) -> None:
    if FAMILIES[name].guidance_argument is None:
        response = client.post("/v1/generations", json=body(name, guidance_scale=GUIDANCE))
        assert response.status_code == 422
        assert error_of(response)["param"] == "guidance_scale"
        return
    low = pixels_of(plain[name])
    high = pixels_of(generate(client, body(name, guidance_scale=OTHER_GUIDANCE)))
    assert not np.array_equal(low, high)


@pytest.mark.parametrize("name", NAMES)
def test_negative_prompt_acts_where_taken_and_is_refused_elsewhere(
    client: httpx.Client, plain: Plain, name: str
) -> None:
    with_negative = body(name, negative_prompt=NEGATIVE)
    if not FAMILIES[name].negative_prompt:
        response = client.post("/v1/generations", json=with_negative)
        assert response.status_code == 422
        assert error_of(response)["param"] == "negative_prompt"
        return
    # Under guidance (> 1), so that the unconditional branch the negative prompt replaces runs; a model
    # whose guidance is its own (HunyuanVideo 1.5's guider) runs that branch by itself.
    assert FAMILIES[name].guidance_argument is None or with_negative["guidance_scale"] > 1
    assert not np.array_equal(pixels_of(generate(client, with_negative)), pixels_of(plain[name]))


@pytest.mark.parametrize("name", [name for name in NAMES if FAMILIES[name].video])
def test_fps_conditions_only_the_families_that_take_it(client: httpx.Client, plain: Plain, name: str) -> None:
    first = pixels_of(plain[name])
    second = pixels_of(generate(client, body(name, fps=OTHER_FPS)))
    if FAMILIES[name].fps_argument is None:
        # Only the container's frame duration changes.
        np.testing.assert_array_equal(first, second)
    else:
        assert not np.array_equal(first, second)


# -- 4: cancel --------------------------------------------------------------------------------------------


@dataclass
class Gate:
    entered: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    # Scheduler steps taken, the held one included.
    steps: int = 0


@contextmanager
def first_step_held(server: LiveServer, name: str) -> Iterator[Gate]:
    """The model's first scheduler step waits for the gate: the worker holds mid-generation.

    The scheduler, not the transformer, is held: every family calls ``scheduler.step`` once per step,
    where the number of transformer calls per step differs (CFG as two calls or one batch).
    """
    generations = server.runtime.generations
    assert generations is not None
    scheduler: Any = generations.models[name].pipeline.scheduler
    original = scheduler.step
    gate = Gate()

    def held_step(*args: Any, **kwargs: Any) -> Any:
        gate.steps += 1
        if gate.steps == 1:
            gate.entered.set()
            gate.release.wait(60)
        return original(*args, **kwargs)

    scheduler.step = held_step
    try:
        yield gate
    finally:
        gate.release.set()
        # The bound method was found on the class; dropping the instance attribute restores it.
        del scheduler.step


def wait_for_final(client: httpx.Client, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.02)


@pytest.mark.parametrize("name", NAMES)
def test_a_cancelled_job_stops_within_one_step(server: LiveServer, client: httpx.Client, name: str) -> None:
    # Steps enough that running on after the cancel would show (PixArt observes its steps by the
    # denoiser's calls, having no step callback, so it is the family where that could go wrong).
    steps = max(FAMILIES[name].steps, 4)
    with first_step_held(server, name) as gate:
        created = client.post("/v1/jobs", json=body(name, steps=steps))
        assert created.status_code == 202, created.text
        job_id = created.json()["id"]
        assert gate.entered.wait(60), "the job never reached its first scheduler step"
        running = client.get(f"/v1/jobs/{job_id}").json()
        assert running["status"] == "running"
        at_cancel = running["progress"]["step"]
        cancelled = client.delete(f"/v1/jobs/{job_id}")
        assert cancelled.status_code == 202, cancelled.text
        gate.release.set()
        final = wait_for_final(client, job_id)
    assert final["status"] == "cancelled", final
    assert final["error"]["code"] == "cancelled"
    assert final["result"] is None
    assert final["progress"]["total_steps"] == steps
    assert final["progress"]["step"] <= at_cancel + 1 < steps
    # Counted apart from the server's own progress: at most the held step and one more.
    assert gate.steps <= 2


# -- 5: cache methods -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "method"), [(name, method) for name in NAMES for method in POLICIES])
def test_each_cache_method_reuses(
    client: httpx.Client, references: References, name: str, method: str
) -> None:
    methods = client.get(f"/v1/models/{name}").json()["cache_methods"]
    if method not in methods:
        pytest.skip(f"{name} does not list {method}")
    guarded = method == "guarded_taylorseer"
    steps = {"steps": max(GUARDED_STEPS, FAMILIES[name].steps)} if guarded else {}
    result = generate(client, body(name, cache={"method": method, **POLICIES[method]}, **steps))
    stats = result["cache"]
    assert stats["method"] == method
    assert stats["blocks_reused"] > 0 or stats["attention_reused"] > 0, stats
    # Every denoiser call of the direct call is counted, over every transformer of the pipeline (Wan 2.2's
    # two experts summed), whether it was computed or served from the cache.
    calls = references[name].denoiser_calls
    assert all(count > 0 for count in calls.values()), calls
    if guarded:
        # More steps than the direct call's: at least one call per step.
        assert stats["denoiser_calls"] >= steps["steps"] and stats["estimated_error"] > 0, stats
    else:
        assert stats["denoiser_calls"] == sum(calls.values()), (stats, calls)


def test_a_size_a_fixed_area_pipeline_would_change_is_refused_and_the_size_it_names_is_made(
    client: httpx.Client,
) -> None:
    # HiDream scales every size to its trained area, keeping the aspect: 128x64 would come out otherwise.
    response = client.post("/v1/generations", json=body("hidream", width=128, height=64))
    assert response.status_code == 422
    error = error_of(response)
    assert error["param"] == "width"
    width, height = (int(side) for side in error["message"].rsplit(" out ", 1)[1].split(";")[0].split("x"))
    (item,) = b64_items(generate(client, body("hidream", width=width, height=height)))
    assert Image.open(io.BytesIO(item)).size == (width, height)


def test_a_video_made_with_sound_carries_it_in_mp4(client: httpx.Client, tmp_path: Path) -> None:
    # LTX-2 makes sound with its video; an mp4 answer has it as its second stream.
    result = generate(client, body("ltx2", output_format="mp4"))
    (item,) = b64_items(result)
    path = tmp_path / "ltx2.mp4"
    path.write_bytes(item)
    probe = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-i", str(path)], capture_output=True, text=True)
    streams = [line for line in probe.stderr.splitlines() if "Stream #" in line]
    assert any("Video:" in line for line in streams) and any("Audio: aac" in line for line in streams)


def test_wan22_runs_both_experts(references: References) -> None:
    # The call counts above cover both experts only if the direct call reaches transformer_2.
    calls = references["wan22"].denoiser_calls
    assert set(calls) == {"transformer", "transformer_2"}
    assert calls["transformer"] > 0 and calls["transformer_2"] > 0


def test_wan22_5bs_card_has_the_5bs_defaults_and_geometry(client: httpx.Client) -> None:
    """Its 48-channel VAE makes it the TI2V 5B: 121 frames of 1280x704 at 24 fps, sizes a multiple of 32
    (16x VAE, 2x2 patches); Wan 2.1's card keeps its pipeline's defaults."""
    card = client.get("/v1/models/wan22_5b").json()
    defaults = card["defaults"]
    assert (defaults["width"], defaults["height"]) == (1280, 704)
    assert (defaults["num_frames"], defaults["fps"]) == (121, 24)
    assert (card["size_multiple"], card["frame_step"], card["limits"]["max_frames"]) == (32, 4, 121)
    wan = client.get("/v1/models/wan").json()
    assert (wan["defaults"]["width"], wan["defaults"]["num_frames"], wan["size_multiple"]) == (832, 81, 16)
    # A size the 16x VAE and its patches cannot take is refused, naming it.
    response = client.post("/v1/generations", json=body("wan22_5b", width=48))
    assert response.status_code == 422 and error_of(response)["param"] == "width", response.text


def test_wan22_5bs_timestep_per_token_reaches_the_policy_as_the_steps(client: httpx.Client) -> None:
    """The 5B's transformer gets one timestep per token (every token at the step's, with no image): a policy
    reads the step's own, so a method's timestep window acts on the steps inside it. 6 steps are 999, 961,
    909, 833, 714 and 501 at its shift, 2 steps 999 and 833."""
    # PAB's default window (100, 800) holds the last two of 6 steps and none of 2.
    pab = {"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2}
    assert generate(client, body("wan22_5b", steps=6, cache=pab))["cache"]["attention_reused"] > 0
    assert generate(client, body("wan22_5b", steps=2, cache=pab))["cache"]["attention_reused"] == 0
    # FasterCache's default windows end at 681 (attention) and 641 (the unconditional pass): only the last
    # of 6 steps is inside them, and a step at 999 is never.
    faster = {"method": "faster_cache", "unconditional_batch_skip_range": 2}
    stats = generate(client, body("wan22_5b", steps=6, cache=faster))["cache"]
    assert stats["attention_reused"] > 0 or stats["blocks_reused"] > 0, stats
    stats = generate(client, body("wan22_5b", steps=2, cache=faster))["cache"]
    assert stats["attention_reused"] == stats["blocks_reused"] == 0, stats


# -- not servable -----------------------------------------------------------------------------------------


def test_an_image_to_image_pipeline_is_refused_at_load_naming_its_class(tmp_path: Path) -> None:
    from diffusers import FluxImg2ImgPipeline

    folder = tmp_path / "flux-img2img"
    # Typed Any: diffusers exports its pipelines lazily, and mypy misses their inherited methods.
    pipeline: Any = FluxImg2ImgPipeline(**tiny_pipeline("flux").build().components)
    pipeline.save_pretrained(folder)
    with pytest.raises(ModelLoadError, match="FluxImg2ImgPipeline") as raised:
        load_model(str(folder), cache_dir=tmp_path / "cache")
    assert "image" in str(raised.value)
