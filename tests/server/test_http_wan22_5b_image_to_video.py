"""Wan 2.2 TI2V 5B's image-to-video task: its text-to-video checkpoint served from its folder, over real HTTP.

The published checkpoint's folder names ``WanPipeline`` with ``expand_timesteps``; the same weights make a
video from an image through ``WanImageToVideoPipeline``, which holds the image's latents as the first latent
frame at timestep 0, as LTX's image-to-video pipeline does. So the model's card lists ``text_to_video`` and
``image_to_video``, the task's pipeline built on the resident components. What the server answers uncached
for an image is what a direct call of ``WanImageToVideoPipeline`` loaded from the same folder gives for the
same image and seed, frame for frame; every cache method the card lists reuses something on it. A Wan 2.1
text model (no ``expand_timesteps``: its transformer cannot take the image that way) has no such task.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import pytest
import torch

from server.models import media
from tiny_pipelines import tiny_pipeline

from .conftest import LiveServer, b64_items, direct_pipeline, error_of, generated, one_thread_server
from .test_http_families import GUARDED_STEPS, POLICIES

# The image-to-video models' image: of another size than the video's, which the pipeline scales.
from .test_http_image_to_video import IMAGE, _b64

PROMPT = "a red cat walking in the snow"
SEED = 7
STEPS = 2
# Above 1, so that the unconditional branch runs (and FasterCache has one to skip): two calls a step.
GUIDANCE = 3.0
CALLS_PER_STEP = 2
FPS = 12
VIDEO_FORMAT = "webp"
# 5 frames of 64x64, a multiple of the 5B's 32 px.
SIZE: Mapping[str, int] = MappingProxyType(dict(tiny_pipeline("wan22_5b").small_call))


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    """The TI2V 5B's text-to-video checkpoint and Wan 2.1's, each in the folder of its family's name."""
    root = tmp_path_factory.mktemp("wan22-5b-image-to-video")
    for name in ("wan22_5b", "wan"):
        tiny_pipeline(name).build().save_pretrained(root / name)
    return MappingProxyType({name: root / name for name in ("wan22_5b", "wan")})


@pytest.fixture(scope="module")
def server(model_cache: Path, folders: Mapping[str, Path]) -> Iterator[LiveServer]:
    yield from one_thread_server(model_cache, models=[str(folder) for folder in folders.values()])


def _body(name: str = "wan22_5b", **fields: Any) -> dict[str, Any]:
    return {
        "model": name,
        "prompt": PROMPT,
        "seed": SEED,
        "steps": STEPS,
        "guidance_scale": GUIDANCE,
        "fps": FPS,
        "output_format": VIDEO_FORMAT,
        "image": _b64(IMAGE),
        **SIZE,
        **fields,
    }


def test_the_5bs_card_lists_image_to_video_and_wan_21s_does_not(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert (cards["wan22_5b"]["kind"], cards["wan22_5b"]["tasks"]) == (
        "video",
        ["text_to_video", "image_to_video"],
    )
    assert cards["wan"]["tasks"] == ["text_to_video"]


def test_an_image_gives_the_direct_call_of_wan_image_to_video_pipeline(
    server: LiveServer, client: httpx.Client, folders: Mapping[str, Path]
) -> None:
    answer = generated(client, _body())
    assert (answer["task"], answer["num_frames"], answer["strength"]) == (
        "image_to_video",
        SIZE["num_frames"],
        None,
    )
    assert len(answer["timings"]["denoising_steps"]) == STEPS
    assert answer["cache"]["denoiser_calls"] == STEPS * CALLS_PER_STEP
    # As the published checkpoint animates an image: its folder, loaded as the image-to-video pipeline.
    pipeline = direct_pipeline("WanImageToVideoPipeline", folders["wan22_5b"])
    assert pipeline.config.expand_timesteps and pipeline.image_encoder is None
    # The server fixture set the process to one thread: the direct call sums in the server's order.
    assert torch.get_num_threads() == 1
    frames = pipeline(
        image=IMAGE,
        prompt=PROMPT,
        **SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        num_videos_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(SEED),
        output_type="pil",
    ).frames[0]
    assert len(frames) == SIZE["num_frames"]
    # The server's deterministic encoder on the direct call's frames: equal frames, equal files.
    assert b64_items(answer) == [media.encode_video(frames, VIDEO_FORMAT, FPS)]
    # The image conditions the video.
    other = generated(client, _body(image=_b64(IMAGE.rotate(90))))
    assert b64_items(other) != b64_items(answer)


@pytest.mark.parametrize("method", POLICIES)
def test_each_cache_method_reuses_on_the_task(client: httpx.Client, method: str) -> None:
    card = client.get("/v1/models/wan22_5b").json()
    assert set(card["cache_methods"]) <= {"none", *POLICIES}
    if method not in card["cache_methods"]:
        pytest.skip(f"wan22_5b does not list {method}")
    steps = GUARDED_STEPS if method == "guarded_taylorseer" else STEPS
    answer = generated(client, _body(steps=steps, cache={"method": method, **POLICIES[method]}))
    stats = answer["cache"]
    assert (answer["task"], stats["method"]) == ("image_to_video", method)
    assert stats["blocks_reused"] > 0 or stats["attention_reused"] > 0, stats
    if method == "guarded_taylorseer":
        assert stats["denoiser_calls"] >= steps, stats
    else:
        assert stats["denoiser_calls"] == steps * CALLS_PER_STEP, stats


def test_wan_21_refuses_an_image_naming_it(client: httpx.Client) -> None:
    response = client.post("/v1/generations", json=_body("wan", **dict(tiny_pipeline("wan").small_call)))
    assert response.status_code == 422, response.text
    error = error_of(response)
    assert error["param"] == "image" and "image-to-video" in error["message"], error
    # And the server goes on serving.
    assert client.get("/ready").status_code == 200


def test_the_task_is_the_rule_of_expand_timesteps(folders: Mapping[str, Path]) -> None:
    """The 5B's very components without expand_timesteps have no image-to-video task: its WanPipeline's
    config decides, not the weights. With it, the task's pipeline holds the text pipeline's components."""
    from diffusers import WanPipeline

    from server.models.call_specs import call_spec
    from server.models.tasks import image_tasks

    pipeline: Any = WanPipeline.from_pretrained(folders["wan22_5b"], local_files_only=True)
    tasks = image_tasks(pipeline, call_spec(pipeline))
    assert list(tasks) == ["image_to_video"]
    task = tasks["image_to_video"].pipeline
    assert type(task).__name__ == "WanImageToVideoPipeline" and task.config["expand_timesteps"]
    shared = {name: component for name, component in task.components.items() if component is not None}
    assert shared.keys() == {name for name, component in pipeline.components.items() if component is not None}
    assert all(component is pipeline.components[name] for name, component in shared.items())
    without: Any = WanPipeline(**pipeline.components, expand_timesteps=False)
    assert image_tasks(without, call_spec(without)) == {}
