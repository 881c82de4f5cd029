"""Images in: image-to-image and inpainting on Flux, SD3 and Qwen-Image models served from their folders,
over real HTTP.

The pipelines of these tasks are built from the resident model's components; what the server answers
uncached is what a direct call of diffusers' own task pipeline (loaded from the same folder) gives for
the same image, mask, strength and seed, pixel for pixel. Every cache policy acts on them; uploads that
are no image this server takes are refused naming the field, and the server goes on serving.
"""

from __future__ import annotations

import base64
import io
import struct
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from tiny_pipelines import tiny_pipeline

from .conftest import (
    LiveServer,
    b64_items,
    direct_pipeline,
    error_of,
    generated,
    live_server,
    one_thread_server,
    pixels_of,
)

PROMPT = "a red circle on a blue background"
STEPS = 6
WIDTH, HEIGHT = 48, 32


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _picture(width: int = WIDTH, height: int = HEIGHT, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def _mask(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """OpenAI's convention: the transparent left half is what to change."""
    mask = Image.new("RGBA", (width, height), (0, 0, 0, 255))
    mask.paste((0, 0, 0, 0), (0, 0, width // 2, height))
    return mask


def _painted(width: int = WIDTH, height: int = HEIGHT) -> Image.Image:
    """MASK as diffusers reads a mask: white where it paints (the transparent left half)."""
    painted = Image.new("L", (width, height), 0)
    painted.paste(255, (0, 0, width // 2, height))
    return painted


IMAGE = _picture()
MASK = _mask()


@dataclass(frozen=True)
class Family:
    """A family's task pipelines and how a direct call of them passes the request's guidance, written
    out here independently of the server."""

    image_to_image: str
    inpainting: str
    guidance_scale: float
    guidance: Mapping[str, Any]


FAMILIES: Mapping[str, Family] = {
    # The tiny Flux has no guidance embedding: guidance is true CFG, off at 1.
    "flux": Family("FluxImg2ImgPipeline", "FluxInpaintPipeline", 1.0, {"true_cfg_scale": 1.0}),
    "sd3": Family(
        "StableDiffusion3Img2ImgPipeline", "StableDiffusion3InpaintPipeline", 3.0, {"guidance_scale": 3.0}
    ),
    # True CFG runs against a negative prompt: the empty one when the request gives none.
    "qwenimage": Family(
        "QwenImageImg2ImgPipeline",
        "QwenImageInpaintPipeline",
        3.0,
        {"true_cfg_scale": 3.0, "negative_prompt": ""},
    ),
}


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("images-in")
    for name in FAMILIES:
        tiny_pipeline(name).build().save_pretrained(root / name)
    return {name: root / name for name in FAMILIES}


@pytest.fixture(scope="module")
def kontext_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An edit model: Flux Kontext on the tiny Flux's components."""
    from diffusers import FluxKontextPipeline

    path = tmp_path_factory.mktemp("images-in-kontext") / "kontext"
    # Typed Any: diffusers exports its pipelines lazily, and mypy misses their inherited methods.
    pipeline: Any = FluxKontextPipeline(**tiny_pipeline("flux").build().components)
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def fill_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An inpainting model: FLUX.1 Fill on the tiny Flux's components, its transformer taking the noise's
    packed latents (32 channels), the masked image's (32) and the mask's (4x4 pixels per latent pixel,
    packed 2x2: 64) beside each other, with its guidance embedded as FLUX.1 Fill-dev's is."""
    import inspect

    from diffusers import FluxFillPipeline, FluxTransformer2DModel

    from tiny_pipelines.flux import RECIPE

    path = tmp_path_factory.mktemp("images-in-fill") / "fill"
    components = tiny_pipeline("flux").build().components
    torch.manual_seed(3)
    transformer: Any = FluxTransformer2DModel(
        **{**RECIPE["transformer"], "in_channels": 128, "out_channels": 32, "guidance_embeds": True}
    )
    takes = inspect.signature(FluxFillPipeline.__init__).parameters
    kept = {name: component for name, component in components.items() if name in takes}
    pipeline: Any = FluxFillPipeline(**{**kept, "transformer": transformer.eval()})
    pipeline.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folder(folders: dict[str, Path]) -> Path:
    return folders["flux"]


@pytest.fixture(scope="module")
def server(
    model_cache: Path, folders: dict[str, Path], kontext_folder: Path, fill_folder: Path
) -> Iterator[LiveServer]:
    models = [*(str(path) for path in folders.values()), str(kontext_folder), str(fill_folder), "tiny-wan"]
    yield from one_thread_server(model_cache, models=models)


def _body(**fields: Any) -> dict[str, Any]:
    return {"model": "flux", "prompt": PROMPT, "steps": STEPS, "seed": 7, **fields}


def _direct(
    folder: Path,
    pipeline_class: str,
    *,
    family: str = "flux",
    guidance: Mapping[str, Any] | None = None,
    **arguments: Any,
) -> np.ndarray:
    """diffusers' own task pipeline, loaded from the folder, called as its documentation shows, with the
    family's guidance unless ``guidance`` says otherwise; an inpainting laid over the image outside its
    mask with diffusers' ``apply_overlay``, as its documentation shows too."""

    pipeline = direct_pipeline(pipeline_class, folder)
    assert torch.get_num_threads() == 1
    output = pipeline(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        num_inference_steps=STEPS,
        num_images_per_prompt=1,
        **(FAMILIES[family].guidance if guidance is None else guidance),
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
        **arguments,
    )
    image = output.images[0]
    if "mask_image" in arguments:
        image = pipeline.image_processor.apply_overlay(arguments["mask_image"], arguments["image"], image)
    return np.asarray(image.convert("RGB"))


def test_each_card_lists_its_tasks(client: httpx.Client) -> None:
    cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
    for name in FAMILIES:
        assert cards[name]["tasks"] == ["text_to_image", "image_to_image", "inpainting"]
    assert cards["tiny-wan"]["tasks"] == ["text_to_video"]
    assert cards["kontext"]["tasks"] == ["text_to_image", "edit", "inpainting"]
    assert cards["fill"]["tasks"] == ["inpainting"]


@pytest.mark.parametrize("name", [name for name in FAMILIES if name != "flux"])
def test_each_familys_tasks_are_the_direct_calls_of_its_pipelines(
    client: httpx.Client, folders: dict[str, Path], name: str
) -> None:
    family = FAMILIES[name]
    image = _b64(_png(IMAGE))
    fields = {"model": name, "guidance_scale": family.guidance_scale, "image": image}
    edited = generated(client, _body(**fields, strength=0.5))
    assert np.array_equal(
        pixels_of(edited),
        _direct(folders[name], family.image_to_image, family=name, image=IMAGE, strength=0.5),
    )
    inpainted = generated(client, _body(**fields, mask=_b64(_png(MASK)), strength=0.8))
    assert inpainted["task"] == "inpainting"
    expected = _direct(
        folders[name], family.inpainting, family=name, image=IMAGE, mask_image=_painted(), strength=0.8
    )
    pixels, source = pixels_of(inpainted), np.asarray(IMAGE)
    assert np.array_equal(pixels, expected)
    # Outside the mask the image is kept, to the pixel; inside, it was painted.
    assert np.array_equal(pixels[:, WIDTH // 2 :], source[:, WIDTH // 2 :])
    assert not np.array_equal(pixels[:, : WIDTH // 2], source[:, : WIDTH // 2])


def test_image_to_image_is_the_direct_call_of_diffusers_pipeline(
    server: LiveServer, client: httpx.Client, folder: Path
) -> None:
    answer = generated(client, _body(image=_b64(_png(IMAGE)), strength=0.5))
    assert (answer["task"], answer["strength"], answer["width"], answer["height"]) == (
        "image_to_image",
        0.5,
        WIDTH,
        HEIGHT,
    )
    # strength x steps of the steps run: 3 of 6.
    assert len(answer["timings"]["denoising_steps"]) == 3
    assert answer["cache"]["denoiser_calls"] == 3
    expected = _direct(folder, "FluxImg2ImgPipeline", image=IMAGE, strength=0.5)
    assert np.array_equal(pixels_of(answer), expected)


def test_inpainting_is_the_direct_call_with_the_mask_read_as_openai_writes_it(
    client: httpx.Client, folder: Path
) -> None:
    # A data URL works as well as bare base64.
    image = "data:image/png;base64," + _b64(_png(IMAGE))
    answer = generated(client, _body(image=image, mask=_b64(_png(MASK)), strength=0.8))
    assert answer["task"] == "inpainting"
    assert len(answer["timings"]["denoising_steps"]) == 5
    # diffusers paints where its mask is white: the transparent half.
    expected = _direct(folder, "FluxInpaintPipeline", image=IMAGE, mask_image=_painted(), strength=0.8)
    assert np.array_equal(pixels_of(answer), expected)
    # What lies outside the mask is the image's own, to the pixel; inside, it was painted.
    pixels, source = pixels_of(answer), np.asarray(IMAGE)
    assert np.array_equal(pixels[:, WIDTH // 2 :], source[:, WIDTH // 2 :])
    assert not np.array_equal(pixels[:, : WIDTH // 2], source[:, : WIDTH // 2])


def test_the_image_sets_the_size_down_to_the_models_multiple(client: httpx.Client) -> None:
    multiple = client.get("/v1/models/flux").json()["size_multiple"]
    answer = generated(client, _body(image=_b64(_png(_picture(WIDTH + multiple - 1, HEIGHT + 1)))))
    assert (answer["width"], answer["height"]) == (WIDTH, HEIGHT)
    assert answer["strength"] == 0.6  # diffusers' default
    given = generated(client, _body(image=_b64(_png(IMAGE)), width=WIDTH * 2, height=HEIGHT))
    assert (given["width"], given["height"]) == (WIDTH * 2, HEIGHT)


def test_every_cache_policy_acts_on_the_image_tasks(client: httpx.Client) -> None:
    card = client.get("/v1/models/flux").json()
    steps = 8
    for task, fields in (
        ("image_to_image", {"image": _b64(_png(IMAGE)), "strength": 1.0}),
        ("inpainting", {"image": _b64(_png(IMAGE)), "mask": _b64(_png(MASK)), "strength": 1.0}),
    ):
        for method, policy in card["method_defaults"].items():
            answer = generated(client, _body(steps=steps, cache=policy, **fields))
            assert answer["task"] == task
            assert answer["cache"]["method"] == method
            assert answer["cache"]["denoiser_calls"] == steps, (task, method)
        # A policy that reuses whatever it can: the image tasks run on the cached transformer.
        loose = generated(
            client, _body(steps=steps, cache={"method": "first_block_cache", "threshold": 10.0}, **fields)
        )
        assert loose["cache"]["steps_cached"] > 0, task


def test_a_cache_policy_acts_on_sd3_inpainting(client: httpx.Client) -> None:
    """SD3's inpainting runs on its 16-channel latents, the model's own transformer under the policy."""
    steps = 8
    fields = {
        "model": "sd3",
        "guidance_scale": FAMILIES["sd3"].guidance_scale,
        "image": _b64(_png(IMAGE)),
        "mask": _b64(_png(MASK)),
        "strength": 1.0,
    }
    for method, policy in client.get("/v1/models/sd3").json()["method_defaults"].items():
        answer = generated(client, _body(steps=steps, cache=policy, **fields))
        assert (answer["task"], answer["cache"]["method"]) == ("inpainting", method)
        assert answer["cache"]["denoiser_calls"] == steps, method
    loose = generated(
        client, _body(steps=steps, cache={"method": "first_block_cache", "threshold": 10.0}, **fields)
    )
    assert loose["cache"]["steps_cached"] > 0
    # Cached, the image outside the mask still comes back as it was.
    pixels, source = pixels_of(loose), np.asarray(IMAGE)
    assert np.array_equal(pixels[:, WIDTH // 2 :], source[:, WIDTH // 2 :])


def test_the_least_strength_still_runs_a_step(client: httpx.Client) -> None:
    answer = generated(client, _body(steps=4, image=_b64(_png(IMAGE)), strength=0.01))
    assert len(answer["timings"]["denoising_steps"]) == 1


def test_run_fields_count_the_steps_that_run(client: httpx.Client) -> None:
    answer = generated(
        client, _body(steps=10, image=_b64(_png(IMAGE)), strength=0.5, cache={"method": "sea_cache"})
    )
    assert answer["cache_policy"]["num_inference_steps"] == 5


def test_a_job_with_an_image_counts_its_steps_and_answers_as_the_sync_call(client: httpx.Client) -> None:
    body = _body(image=_b64(_png(IMAGE)), strength=0.5)
    job = client.post("/v1/jobs", json=body).json()
    assert job["progress"]["total_steps"] == 3
    for _ in range(600):
        view = client.get(f"/v1/jobs/{job['id']}").json()
        if view["status"] not in ("queued", "running"):
            break
    else:  # pragma: no cover - the job would have to hang
        pytest.fail("the job did not finish")
    assert view["status"] == "succeeded", view
    assert view["progress"] == {"step": 3, "total_steps": 3}
    assert b64_items(view["result"]) == b64_items(generated(client, body))


def _bomb() -> bytes:
    """A PNG whose header claims 30000 x 30000 pixels, a few hundred bytes on the wire."""
    data = bytearray(_png(Image.new("RGB", (1, 1))))
    # IHDR's width and height follow the signature (8), the chunk length (4) and type (4).
    data[16:24] = struct.pack(">II", 30000, 30000)
    crc = zlib.crc32(bytes(data[12:29]))
    data[29:33] = struct.pack(">I", crc)
    return bytes(data)


def _gif() -> bytes:
    buffer = io.BytesIO()
    IMAGE.save(buffer, format="GIF")
    return buffer.getvalue()


HOSTILE = [
    ({"image": "not base64 at all!"}, "image"),
    ({"image": _b64(b"\x89PNG\r\n\x1a\n but not really")}, "image"),
    ({"image": _b64(_gif())}, "image"),
    ({"image": _b64(_bomb())}, "image"),
    ({"image": "data:text/plain;base64,aGVsbG8="}, "image"),
    ({"image": [_b64(_png(IMAGE))] * 2}, "image"),
    ({"image": []}, "image"),
    ({"image": _b64(_png(IMAGE)), "mask": _b64(_png(_mask(WIDTH // 2, HEIGHT)))}, "mask"),
    ({"image": _b64(_png(IMAGE)), "mask": _b64(_png(IMAGE))}, "mask"),
    ({"mask": _b64(_png(MASK))}, "mask"),
    ({"strength": 0.5}, "strength"),
    ({"image": _b64(_png(IMAGE)), "strength": 0}, "strength"),
    ({"image": _b64(_png(_picture(4, 4)))}, "image"),
    ({"model": "tiny-wan", "image": _b64(_png(IMAGE)), "output_format": "gif"}, "image"),
]


@pytest.mark.parametrize(("fields", "param"), HOSTILE)
def test_an_upload_this_server_cannot_take_is_a_4xx_naming_the_field(
    client: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    response = client.post("/v1/generations", json=_body(**fields))
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["param"] == param, response.text
    # And the server goes on serving.
    assert client.get("/ready").status_code == 200


def test_more_bytes_than_the_body_limit_are_refused_before_they_are_read(server: LiveServer) -> None:
    limit = server.runtime.settings.max_body_bytes
    with server.client() as client:
        response = client.post("/v1/generations", json=_body(image="A" * (limit + 1)))
    assert response.status_code == 413


# -- OpenAI's image edits ---------------------------------------------------------------------------------


def test_the_openai_sdk_edits_an_image_and_inpaints_behind_a_mask(server: LiveServer, folder: Path) -> None:
    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    ours = {"seed": 7, "steps": STEPS, "strength": 0.5, "cache": '{"method": "none"}'}
    edited = sdk.images.edit(
        model="flux",
        image=("image.png", _png(IMAGE), "image/png"),
        prompt=PROMPT,
        size=f"{WIDTH}x{HEIGHT}",
        response_format="b64_json",
        extra_body=ours,
    )
    assert edited.data is not None and edited.data[0].b64_json is not None
    answer = edited.model_dump()
    assert (answer["task"], answer["size"], answer["seed"]) == ("image_to_image", f"{WIDTH}x{HEIGHT}", 7)
    expected = _direct(folder, "FluxImg2ImgPipeline", image=IMAGE, strength=0.5)
    assert np.array_equal(pixels_of({"data": [{"b64_json": edited.data[0].b64_json}]}), expected)

    inpainted = sdk.images.edit(
        model="flux",
        image=("image.png", _png(IMAGE), "image/png"),
        mask=("mask.png", _png(MASK), "image/png"),
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={**ours, "strength": 0.8},
    )
    assert inpainted.model_dump()["task"] == "inpainting"
    expected = _direct(folder, "FluxInpaintPipeline", image=IMAGE, mask_image=_painted(), strength=0.8)
    assert inpainted.data is not None
    assert np.array_equal(pixels_of({"data": [{"b64_json": inpainted.data[0].b64_json}]}), expected)


def _edit(client: httpx.Client, files: list[tuple[str, Any]], **fields: str) -> httpx.Response:
    data = {"model": "flux", "prompt": PROMPT, "steps": str(STEPS), **fields}
    return client.post("/v1/images/edits", data=data, files=files)


def test_an_edit_takes_our_fields_as_form_fields(client: httpx.Client) -> None:
    png = ("image.png", _png(IMAGE), "image/png")
    response = _edit(
        client,
        [("image", png)],
        seed="3",
        strength="0.5",
        cache='{"method": "first_block_cache", "threshold": 10}',
    )
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["seed"], answer["cache_policy"]["method"]) == (3, "first_block_cache")
    assert answer["cache"]["steps_cached"] > 0
    assert "denoising" in response.headers["server-timing"]


@pytest.mark.parametrize(
    ("files", "fields", "param"),
    [
        ([], {}, "image"),
        ([("image", ("a.png", _png(IMAGE), "image/png"))], {"quality": "high"}, "quality"),
        ([("image", ("a.png", _png(IMAGE), "image/png"))], {"steps": "many"}, "steps"),
        ([("image", ("a.png", _png(IMAGE), "image/png"))], {"cache": "{not json"}, "cache"),
        ([("image", ("a.png", _png(IMAGE), "image/png"))], {"cache": '{"method": "nope"}'}, "cache.method"),
        ([("image", ("a.png", _png(IMAGE), "image/png"))], {"response_format": "url"}, "response_format"),
        ([("image", ("a.gif", _gif(), "image/gif"))], {}, "image"),
        ([("image", ("a.png", _bomb(), "image/png"))], {}, "image"),
        ([("image[]", ("a.png", _png(IMAGE), "image/png"))] * 2, {}, "image"),
        (
            [("image", ("a.png", _png(IMAGE), "image/png")), ("mask", ("m.png", _png(IMAGE), "image/png"))],
            {},
            "mask",
        ),
        (
            [("image", ("a.png", _png(IMAGE), "image/png")), ("photo", ("p.png", b"x", "image/png"))],
            {},
            "photo",
        ),
    ],
)
def test_an_edit_this_server_cannot_take_is_a_4xx_naming_the_field(
    client: httpx.Client, files: list[tuple[str, Any]], fields: dict[str, str], param: str
) -> None:
    response = _edit(client, files, **fields)
    assert 400 <= response.status_code < 500, response.text
    assert error_of(response)["param"] == param, response.text
    assert client.get("/ready").status_code == 200


def test_an_edit_must_be_a_multipart_body(client: httpx.Client) -> None:
    response = client.post("/v1/images/edits", json={"prompt": PROMPT, "image": _b64(_png(IMAGE))})
    assert response.status_code == 422 and "multipart" in error_of(response)["message"]


# -- an edit model ----------------------------------------------------------------------------------------


def _kontext(folder: Path, pipeline_class: str = "FluxKontextPipeline", **arguments: Any) -> np.ndarray:
    """diffusers' Kontext pipeline (or its inpainting one) from the folder, called as documented, its
    output's area bounded to the size asked and its image taken at its own size (max_area and _auto_resize
    would otherwise rescale both to a megapixel); an inpainting laid over the image outside its mask."""

    pipeline = direct_pipeline(pipeline_class, folder)
    output = pipeline(
        prompt=PROMPT,
        height=HEIGHT,
        width=WIDTH,
        max_area=WIDTH * HEIGHT,
        _auto_resize=False,
        num_inference_steps=STEPS,
        num_images_per_prompt=1,
        true_cfg_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
        **arguments,
    )
    image = output.images[0]
    if "mask_image" in arguments:
        image = pipeline.image_processor.apply_overlay(arguments["mask_image"], arguments["image"], image)
    return np.asarray(image.convert("RGB"))


def test_an_edit_model_edits_the_image_as_a_direct_call_does(
    server: LiveServer, client: httpx.Client, kontext_folder: Path
) -> None:
    body = _body(model="kontext", width=WIDTH, height=HEIGHT)
    plain = generated(client, body)
    assert plain["task"] == "text_to_image"
    assert np.array_equal(pixels_of(plain), _kontext(kontext_folder))
    edited = generated(client, {**body, "image": _b64(_png(IMAGE))})
    assert (edited["task"], edited["strength"]) == ("edit", None)
    # No strength: every step runs.
    assert len(edited["timings"]["denoising_steps"]) == STEPS
    expected = _kontext(kontext_folder, image=IMAGE)
    assert np.array_equal(pixels_of(edited), expected)

    from openai import OpenAI

    sdk = OpenAI(base_url=f"{server.base_url}/v1", api_key="unused", max_retries=0)
    answer = sdk.images.edit(
        model="kontext",
        image=("image.png", _png(IMAGE), "image/png"),
        prompt=PROMPT,
        response_format="b64_json",
        extra_body={"seed": 7, "steps": STEPS},
    )
    assert answer.data is not None and answer.model_dump()["task"] == "edit"
    assert np.array_equal(pixels_of({"data": [{"b64_json": answer.data[0].b64_json}]}), expected)


def test_an_edit_takes_no_strength(client: httpx.Client) -> None:
    response = client.post(
        "/v1/generations", json=_body(model="kontext", image=_b64(_png(IMAGE)), strength=0.5)
    )
    assert response.status_code == 422 and error_of(response)["param"] == "strength", response.text


def test_an_edit_model_inpaints_behind_a_mask_as_its_inpainting_pipeline_does(
    client: httpx.Client, kontext_folder: Path
) -> None:
    """Kontext's inpainting pipeline, on the model's own components: without a strength it runs at the
    pipeline's own default (1: every step), with one at that strength."""
    body = _body(model="kontext", width=WIDTH, height=HEIGHT, image=_b64(_png(IMAGE)), mask=_b64(_png(MASK)))
    whole = generated(client, body)
    assert (whole["task"], whole["strength"]) == ("inpainting", 1.0)
    assert len(whole["timings"]["denoising_steps"]) == STEPS
    inpainting = "FluxKontextInpaintPipeline"
    expected = _kontext(kontext_folder, inpainting, image=IMAGE, mask_image=_painted())
    assert np.array_equal(pixels_of(whole), expected)
    half = generated(client, {**body, "strength": 0.5})
    assert len(half["timings"]["denoising_steps"]) == STEPS // 2
    expected = _kontext(kontext_folder, inpainting, image=IMAGE, mask_image=_painted(), strength=0.5)
    pixels, source = pixels_of(half), np.asarray(IMAGE)
    assert np.array_equal(pixels, expected)
    assert np.array_equal(pixels[:, WIDTH // 2 :], source[:, WIDTH // 2 :])


# -- an inpainting model ----------------------------------------------------------------------------------


def test_an_inpainting_model_inpaints_as_a_direct_call_does(client: httpx.Client, fill_folder: Path) -> None:
    """FLUX.1 Fill: its own pipeline, at its own defaults (strength 1, guidance 30, embedded), the image
    kept outside the mask."""
    card = client.get("/v1/models/fill").json()
    assert card["defaults"]["guidance_scale"] == 30.0
    body = {"model": "fill", "prompt": PROMPT, "steps": STEPS, "seed": 7, "image": _b64(_png(IMAGE))}
    answer = generated(client, {**body, "mask": _b64(_png(MASK))})
    assert (answer["task"], answer["strength"]) == ("inpainting", 1.0)
    # Its guidance left to its own default, as the request leaves it.
    expected = _direct(fill_folder, "FluxFillPipeline", guidance={}, image=IMAGE, mask_image=_painted())
    pixels, source = pixels_of(answer), np.asarray(IMAGE)
    assert np.array_equal(pixels, expected)
    assert np.array_equal(pixels[:, WIDTH // 2 :], source[:, WIDTH // 2 :])
    assert not np.array_equal(pixels[:, : WIDTH // 2], source[:, : WIDTH // 2])
    # A policy acts on it as on any Flux.
    loose = {"method": "first_block_cache", "threshold": 10.0}
    cached = generated(client, {**body, "mask": _b64(_png(MASK)), "cache": loose})
    assert cached["cache"]["steps_cached"] > 0, cached["cache"]


@pytest.mark.parametrize(
    ("fields", "param"),
    [({}, "image"), ({"image": _b64(_png(IMAGE))}, "mask")],
    ids=["no image", "no mask"],
)
def test_an_inpainting_model_needs_an_image_and_a_mask(
    client: httpx.Client, fields: dict[str, Any], param: str
) -> None:
    response = client.post(
        "/v1/generations", json={"model": "fill", "prompt": PROMPT, "steps": STEPS, **fields}
    )
    assert response.status_code == 422 and error_of(response)["param"] == param, response.text
    assert "inpainting" in error_of(response)["message"]


# -- a video from an image ---------------------------------------------------------------------------------

VIDEO: dict[str, Any] = {
    "width": 128,
    "height": 128,
    "num_frames": 9,
    "steps": 2,
    "fps": 12,
    "guidance_scale": 3.0,
}


@pytest.fixture(scope="module")
def ltx_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("images-in-ltx") / "ltx"
    tiny_pipeline("ltx").build().save_pretrained(path)
    return path


def test_a_video_model_animates_an_image_as_a_direct_call_does(
    model_cache: Path, ltx_folder: Path, server: LiveServer
) -> None:

    from server.models import media

    # The LTX model in a server of its own, with the module's thread count (the ``server`` fixture's).
    for ltx in live_server(model_cache, models=[str(ltx_folder)], torch_threads=1):
        with ltx.client() as client:
            assert client.get("/v1/models/ltx").json()["tasks"] == ["text_to_video", "image_to_video"]
            start = _picture(VIDEO["width"], VIDEO["height"], seed=3)
            body = {"model": "ltx", "prompt": PROMPT, "seed": 7, "output_format": "webp", **VIDEO}
            answer = generated(client, {**body, "image": _b64(_png(start))})
            refused = client.post(
                "/v1/generations", json={**body, "image": _b64(_png(start)), "strength": 0.5}
            )
            assert refused.status_code == 422 and error_of(refused)["param"] == "strength"
    assert (answer["task"], answer["num_frames"]) == ("image_to_video", VIDEO["num_frames"])
    assert len(answer["timings"]["denoising_steps"]) == VIDEO["steps"]
    pipeline = direct_pipeline("LTXImageToVideoPipeline", ltx_folder)
    frames = pipeline(
        image=start,
        prompt=PROMPT,
        width=VIDEO["width"],
        height=VIDEO["height"],
        num_frames=VIDEO["num_frames"],
        frame_rate=VIDEO["fps"],
        num_inference_steps=VIDEO["steps"],
        guidance_scale=VIDEO["guidance_scale"],
        num_videos_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
    ).frames[0]
    # The server's deterministic encoder on the direct call's frames: equal frames, equal files.
    assert b64_items(answer) == [media.encode_video(frames, "webp", VIDEO["fps"])]


# -- the trained shapes model ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes(model_cache: Path, server: LiveServer) -> Iterator[LiveServer]:
    # After ``server``: its one torch thread is the process's setting, for the direct call too.
    yield from live_server(model_cache, models=["shapes-flux"], torch_threads=1)


def test_shapes_flux_edits_as_its_direct_call_and_a_target_counts_the_steps_that_run(
    shapes: LiveServer,
) -> None:

    from server.models.builtin import SHAPES_FLUX_FOLDER

    scene = Image.new("RGB", (64, 64), (40, 80, 220))
    scene.paste((220, 40, 40), (24, 24, 40, 40))
    body = {
        "model": "shapes-flux",
        "prompt": "a small green square in the center on a blue background",
        "seed": 5,
    }
    with shapes.client() as client:
        edited = generated(client, {**body, "image": _b64(_png(scene)), "strength": 0.8})
        from openai import OpenAI

        sdk = OpenAI(base_url=f"{shapes.base_url}/v1", api_key="unused", max_retries=0)
        through_sdk = sdk.images.edit(
            model="shapes-flux",
            image=("scene.png", _png(scene), "image/png"),
            prompt=str(body["prompt"]),
            response_format="b64_json",
            extra_body={"seed": 5, "strength": 0.8},
        )
        targeted = generated(
            client,
            {**body, "image": _b64(_png(scene)), "strength": 0.5, "cache": {"target": {"min_psnr": 30}}},
        )
    pipeline = direct_pipeline("FluxImg2ImgPipeline", SHAPES_FLUX_FOLDER)
    # shapes-flux's served defaults: 20 steps at true CFG 3, prompts of 16 tokens.
    expected = pipeline(
        image=scene,
        prompt=body["prompt"],
        negative_prompt="",
        true_cfg_scale=3.0,
        strength=0.8,
        height=64,
        width=64,
        num_inference_steps=20,
        num_images_per_prompt=1,
        max_sequence_length=16,
        generator=torch.Generator("cpu").manual_seed(5),
        output_type="pil",
    ).images[0]
    assert np.array_equal(pixels_of(edited), np.asarray(expected.convert("RGB")))
    assert through_sdk.data is not None
    assert np.array_equal(
        pixels_of({"data": [{"b64_json": through_sdk.data[0].b64_json}]}), pixels_of(edited)
    )
    # Half of 20 steps run: the target chose from the nearest calibrated curve, and says it is not the
    # setting calibrated.
    promise = targeted["cache_policy"]["target"]
    assert len(targeted["timings"]["denoising_steps"]) == 10
    assert promise["outside_calibration"] is True and promise["calibrated"]["steps"] == 20


def test_the_task_pipelines_share_the_models_components_in_its_dtype(model_cache: Path) -> None:
    """No second copy of the weights, and no cast: a model served in bfloat16 stays in bfloat16."""
    from server.models.registry import load_model

    model = load_model("tiny-flux", cache_dir=model_cache, dtype="bfloat16")
    assert set(model.tasks) == {"image_to_image", "inpainting"}
    for task in model.tasks.values():
        shared = {
            name: component for name, component in task.pipeline.components.items() if component is not None
        }
        assert shared and all(
            component is model.pipeline.components[name] for name, component in shared.items()
        )
    for name in ("transformer", "vae", "text_encoder"):
        assert {parameter.dtype for parameter in model.pipeline.components[name].parameters()} == {
            torch.bfloat16
        }


# -- an edit model taking several images --------------------------------------------------------------------


def test_flux2_edits_from_several_images_as_its_direct_call_does(model_cache: Path, tmp_path: Path) -> None:

    folder = tmp_path / "flux2"
    tiny_pipeline("flux2").build().save_pretrained(folder)
    first, second = _picture(64, 64, seed=4), _picture(80, 64, seed=5)
    body = {
        "model": "flux2",
        "prompt": PROMPT,
        "seed": 7,
        "steps": 2,
        "guidance_scale": 3.0,
        "width": 32,
        "height": 32,
    }
    for served in one_thread_server(model_cache, models=[str(folder)]):
        with served.client() as client:
            assert client.get("/v1/models/flux2").json()["tasks"] == ["text_to_image", "edit", "inpainting"]
            answer = generated(client, {**body, "image": [_b64(_png(first)), _b64(_png(second))]})
            inpainted = generated(
                client,
                {
                    **body,
                    "width": 64,
                    "height": 64,
                    "image": _b64(_png(first)),
                    "mask": _b64(_png(_mask(64, 64))),
                },
            )
            too_many = client.post("/v1/generations", json={**body, "image": [_b64(_png(first))] * 11})
            bad_second = client.post("/v1/generations", json={**body, "image": [_b64(_png(first)), "nope"]})
            # FLUX.2 takes images of 64 px a side or more: the pipeline's own check, before the queue.
            small = client.post(
                "/v1/generations", json={**body, "image": [_b64(_png(first)), _b64(_png(_picture(32, 32)))]}
            )
    assert answer["task"] == "edit"
    assert too_many.status_code == 422 and error_of(too_many)["param"] == "image"
    assert bad_second.status_code == 422 and error_of(bad_second)["param"] == "image.1"
    assert small.status_code == 422 and error_of(small)["param"] == "image.1"
    expected = _klein(folder, "Flux2KleinPipeline", 32, image=[first, second])
    assert np.array_equal(pixels_of(answer), expected)
    # Behind a mask, FLUX.2 Klein's inpainting pipeline on the same components, at its own default
    # strength (0.8: 1 of 2 steps).
    assert (inpainted["task"], inpainted["strength"]) == ("inpainting", 0.8)
    pixels = pixels_of(inpainted)
    expected = _klein(folder, "Flux2KleinInpaintPipeline", 64, image=first, mask_image=_painted(64, 64))
    assert np.array_equal(pixels, expected)
    assert np.array_equal(pixels[:, 32:], np.asarray(first)[:, 32:])


def _klein(folder: Path, pipeline_class: str, side: int, **arguments: Any) -> np.ndarray:
    """A FLUX.2 Klein pipeline from the folder, called as documented at ``side`` x ``side``; an inpainting
    laid over the image outside its mask."""
    pipeline = direct_pipeline(pipeline_class, folder)
    image = pipeline(
        prompt=PROMPT,
        width=side,
        height=side,
        num_inference_steps=2,
        guidance_scale=3.0,
        num_images_per_prompt=1,
        generator=torch.Generator("cpu").manual_seed(7),
        output_type="pil",
        **arguments,
    ).images[0]
    if "mask_image" in arguments:
        image = pipeline.image_processor.apply_overlay(arguments["mask_image"], arguments["image"], image)
    return np.asarray(image.convert("RGB"))
