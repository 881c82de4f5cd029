"""Image-to-video models: Wan 2.1, Wan 2.2 A14B and TI2V 5B, CogVideoX and HunyuanVideo image-to-video
checkpoints served from their folders, over real HTTP.

Their pipelines are weights of their own (Wan 2.1's transformer attends to the image's CLIP tokens, Wan
2.2's two experts and CogVideoX's transformer take its latents beside the noise, Wan 2.2 TI2V's as its
first latent frame, HunyuanVideo's LLaVA reads
the image with the prompt and its transformer takes the image's latents in the first frame's tokens or
beside the noise), so a folder whose pipeline is one of them is a model that makes videos from images and
nothing else: its card's one task is ``image_to_video``, and a request without an image is refused naming
``image``. What the server answers uncached is what a direct call of the same diffusers pipeline, loaded
from the same folder, gives for the same image and seed, frame for frame; every cache method the card
lists reuses something on it.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from server.models import media
from tiny_pipelines import IMAGE_TO_VIDEO_NAMES, tiny_pipeline

from .conftest import LiveServer, b64_items, direct_pipeline, error_of, generated, one_thread_server
from .test_http_families import GUARDED_STEPS, POLICIES

PROMPT = "a red cat walking in the snow"
SEED = 7
STEPS = 2
# Above 1, so that the unconditional branch runs (and FasterCache has one to skip).
GUIDANCE = 3.0
FPS = 12
VIDEO_FORMAT = "webp"


@dataclass(frozen=True)
class Family:
    """What a direct diffusers call of one image-to-video family looks like, written out here independently
    of the server."""

    pipeline_class: str
    # Transformer calls per step: Wan runs its two CFG branches as two calls, CogVideoX as one batch,
    # HunyuanVideo-I2V embeds its guidance (one call) and the 33ch checkpoint runs true CFG (two).
    calls_per_step: int
    # What the direct call passes for the request's guidance_scale: HunyuanVideo-I2V-33ch has no guidance
    # embedding, so its guidance is true CFG against the empty prompt.
    guidance: tuple[tuple[str, Any], ...] = (("guidance_scale", GUIDANCE),)
    # Leading frames the pipeline drops from what it decodes (the 33ch checkpoint's first 4): the direct
    # call asks for them on top of the video's.
    frames_dropped: int = 0
    # Enough for every transformer to get steps: Wan 2.2 A14B's experts split them at its boundary, and each
    # needs two of its own for a cache method to reuse the first.
    steps: int = STEPS
    # Guarded TaylorSeer's: each expert is guarded by itself and predicts from its own third step.
    guarded_steps: int = GUARDED_STEPS
    # The transformers the direct call runs (Wan 2.2's high- and low-noise experts).
    transformers: tuple[str, ...] = ("transformer",)


FAMILIES: Mapping[str, Family] = MappingProxyType(
    {
        "wan_i2v": Family("WanImageToVideoPipeline", calls_per_step=2),
        # 4 steps are 999, 937, 833 and 625 at its shift, 2 per expert about its boundary of 900; 6 are 3 each.
        "wan22_i2v": Family(
            "WanImageToVideoPipeline",
            calls_per_step=2,
            steps=4,
            guarded_steps=6,
            transformers=("transformer", "transformer_2"),
        ),
        # One transformer taking a timestep per token (the image's first latent frame at 0).
        "wan22_ti2v": Family("WanImageToVideoPipeline", calls_per_step=2),
        "cogvideox_i2v": Family("CogVideoXImageToVideoPipeline", calls_per_step=1),
        "hunyuan_video_i2v": Family("HunyuanVideoImageToVideoPipeline", calls_per_step=1),
        "hunyuan_video_i2v_33ch": Family(
            "HunyuanVideoImageToVideoPipeline",
            calls_per_step=2,
            guidance=(("true_cfg_scale", GUIDANCE), ("negative_prompt", "")),
            frames_dropped=4,
        ),
    }
)
NAMES = tuple(FAMILIES)


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(image: Image.Image) -> str:
    return base64.b64encode(_png(image)).decode("ascii")


def _picture(width: int, height: int, seed: int = 3) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _size(name: str) -> dict[str, int]:
    return dict(tiny_pipeline(name).small_call)


# An image of another size than the video's: the pipeline scales it to the video's own.
IMAGE = _picture(48, 40)


def test_the_table_covers_every_image_to_video_tiny_pipeline() -> None:
    assert set(FAMILIES) == set(IMAGE_TO_VIDEO_NAMES)


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> Mapping[str, Path]:
    root = tmp_path_factory.mktemp("image-to-video")
    for name in FAMILIES:
        tiny_pipeline(name).build().save_pretrained(root / name)
    return MappingProxyType({name: root / name for name in FAMILIES})


@pytest.fixture(scope="module")
def server(model_cache: Path, folders: Mapping[str, Path]) -> Iterator[LiveServer]:
    yield from one_thread_server(model_cache, models=[str(folder) for folder in folders.values()])


def _body(name: str, **fields: Any) -> dict[str, Any]:
    return {
        "model": name,
        "prompt": PROMPT,
        "seed": SEED,
        "steps": FAMILIES[name].steps,
        "guidance_scale": GUIDANCE,
        "fps": FPS,
        "output_format": VIDEO_FORMAT,
        "image": _b64(IMAGE),
        **_size(name),
        **fields,
    }


def test_each_card_lists_image_to_video_alone(client: httpx.Client, folders: Mapping[str, Path]) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    assert set(cards) == set(FAMILIES)
    for name, card in cards.items():
        assert card["source"] == f"local:{folders[name]}"
        assert (card["kind"], card["tasks"]) == ("video", ["image_to_video"])


@pytest.mark.parametrize("name", NAMES)
def test_the_video_is_the_direct_call_of_the_pipeline(
    server: LiveServer, client: httpx.Client, folders: Mapping[str, Path], name: str
) -> None:
    family = FAMILIES[name]
    answer = generated(client, _body(name))
    size = _size(name)
    assert (answer["task"], answer["num_frames"]) == ("image_to_video", size["num_frames"])
    assert len(answer["timings"]["denoising_steps"]) == family.steps
    pipeline = direct_pipeline(family.pipeline_class, folders[name])
    # The server fixture set the process to one thread: the direct call sums in the server's order.
    assert torch.get_num_threads() == 1
    calls = dict.fromkeys(family.transformers, 0)

    def counter(transformer: str) -> Any:
        def count(*_: Any) -> None:
            calls[transformer] += 1

        return count

    hooks = [
        getattr(pipeline, transformer).register_forward_hook(counter(transformer)) for transformer in calls
    ]
    try:
        frames = pipeline(
            image=IMAGE,
            prompt=PROMPT,
            **{**size, "num_frames": size["num_frames"] + family.frames_dropped},
            num_inference_steps=family.steps,
            **dict(family.guidance),
            num_videos_per_prompt=1,
            generator=torch.Generator("cpu").manual_seed(SEED),
            output_type="pil",
        ).frames[0]
    finally:
        for hook in hooks:
            hook.remove()
    # Every transformer the family has runs in the direct call (both of Wan 2.2's experts), and the steps'
    # calls are theirs.
    assert all(count > 0 for count in calls.values()), calls
    assert sum(calls.values()) == family.steps * family.calls_per_step, calls
    # The frames asked for, after any the pipeline drops.
    assert len(frames) == size["num_frames"]
    # The server's deterministic encoder on the direct call's frames: equal frames, equal files.
    assert b64_items(answer) == [media.encode_video(frames, VIDEO_FORMAT, FPS)]
    # The image conditions the video.
    other = generated(client, _body(name, image=_b64(IMAGE.rotate(90))))
    assert b64_items(other) != b64_items(answer)


@pytest.mark.parametrize(("name", "method"), [(name, method) for name in NAMES for method in POLICIES])
def test_each_cache_method_reuses(client: httpx.Client, name: str, method: str) -> None:
    card = client.get(f"/v1/models/{name}").json()
    # Every method listed gets a policy here.
    assert set(card["cache_methods"]) <= {"none", *POLICIES}
    if method not in card["cache_methods"]:
        pytest.skip(f"{name} does not list {method}")
    family = FAMILIES[name]
    steps = family.guarded_steps if method == "guarded_taylorseer" else family.steps
    answer = generated(client, _body(name, steps=steps, cache={"method": method, **POLICIES[method]}))
    stats = answer["cache"]
    assert (answer["task"], stats["method"]) == ("image_to_video", method)
    assert stats["blocks_reused"] > 0 or stats["attention_reused"] > 0, stats
    if method == "guarded_taylorseer":
        assert stats["denoiser_calls"] >= steps, stats
    else:
        # Over every transformer (Wan 2.2's two experts summed).
        assert stats["denoiser_calls"] == steps * family.calls_per_step, stats


@pytest.mark.parametrize("name", NAMES)
def test_a_request_without_an_image_is_refused_naming_it(client: httpx.Client, name: str) -> None:
    body = _body(name)
    del body["image"]
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 422, response.text
    assert error_of(response)["param"] == "image"
    # Nor may it ask for what only an image-to-image or inpainting task takes.
    for field, value in (("strength", 0.5), ("mask", _b64(IMAGE))):
        refused = client.post("/v1/generations", json=_body(name, **{field: value}))
        assert refused.status_code == 422 and error_of(refused)["param"] == field, refused.text
    # And the server goes on serving.
    assert client.get("/ready").status_code == 200


def test_cogvideox_i2v_refuses_a_size_its_learned_embeddings_do_not_cover(client: httpx.Client) -> None:
    size = _size("cogvideox_i2v")
    wider = client.post("/v1/generations", json=_body("cogvideox_i2v", width=2 * size["width"]))
    assert wider.status_code == 422 and error_of(wider)["param"] == "width", wider.text
    # Without a size, the image's would be asked for: the image is at fault.
    body = _body("cogvideox_i2v", image=_b64(_picture(2 * size["width"], size["height"])))
    del body["width"], body["height"]
    sized_by_image = client.post("/v1/generations", json=body)
    assert sized_by_image.status_code == 422 and error_of(sized_by_image)["param"] == "image"
    # Wan's transformer has no such embeddings: another size is made.
    wan = _size("wan_i2v")
    answer = generated(client, _body("wan_i2v", width=2 * wan["width"]))
    (item,) = b64_items(answer)
    with Image.open(io.BytesIO(item)) as video:
        assert video.size == (2 * wan["width"], wan["height"])


def test_wan22_ti2vs_timestep_per_token_reaches_the_policy_as_the_steps(client: httpx.Client) -> None:
    """Wan 2.2 TI2V's transformer gets one timestep per token, the image's tokens at 0: a policy reads the
    step's own. PAB's default window (100, 800) holds the later of 6 steps (999 ... 501 at its shift), so it
    broadcasts there; read as the image tokens' 0, it would never have."""
    policy = {"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2}
    answer = generated(client, _body("wan22_ti2v", steps=6, cache=policy))
    assert answer["cache"]["attention_reused"] > 0, answer["cache"]
    # Outside the window, at every step of a 2-step run (999 and 833), it broadcasts nothing.
    answer = generated(client, _body("wan22_ti2v", steps=2, cache=policy))
    assert answer["cache"]["attention_reused"] == 0, answer["cache"]


def test_hunyuan_video_i2v_33ch_is_asked_for_the_frames_it_drops(client: httpx.Client) -> None:
    """Its pipeline drops the first 4 frames it decodes: its clips are 4 frames shorter than the pipeline's
    (129 by default, its longest), and a request for one frame gets one."""
    card = client.get("/v1/models/hunyuan_video_i2v_33ch").json()
    assert card["defaults"]["num_frames"] == card["limits"]["max_frames"] == 129 - 4
    answer = generated(client, _body("hunyuan_video_i2v_33ch", num_frames=1))
    assert answer["num_frames"] == 1
    (item,) = b64_items(answer)
    with Image.open(io.BytesIO(item)) as video:
        assert getattr(video, "n_frames", 1) == 1
    # The token_replace checkpoint drops none.
    assert client.get("/v1/models/hunyuan_video_i2v").json()["defaults"]["num_frames"] == 129


@pytest.mark.parametrize("name", NAMES)
def test_a_compiled_models_warm_up_animates_an_image(
    model_cache: Path, folders: Mapping[str, Path], name: str
) -> None:
    """The warm-up's generations are requests the model takes: each brings an image."""
    from server.models.generation import check_params
    from server.models.registry import load_model
    from server.runtime.warm_up import warm_up_params

    model = load_model(str(folders[name]), cache_dir=model_cache)
    warm = warm_up_params(model)
    # CogVideoX's learned embeddings leave it one size: no second size to warm up.
    assert len(warm) == (1 if name == "cogvideox_i2v" else 2)
    for params in warm:
        assert params.image is not None and params.task == "image_to_video"
        check_params(model, params)
