"""Isolation: the same body and seed give the same bytes whatever ran before it or beside it."""

from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx

from .conftest import LiveServer, b64_items, wait_until

STEPS = 5
# The requests under watch: PNG is lossless, so any difference in the pixels shows in the bytes.
WATCHED: dict[str, dict[str, Any]] = {
    "flux-none": {"model": "tiny-flux", "prompt": "a yellow star at the top", "steps": STEPS, "seed": 7},
    "flux-fbc": {
        "model": "tiny-flux",
        "prompt": "a yellow star at the top",
        "steps": STEPS,
        "seed": 7,
        "cache": {"method": "first_block_cache", "threshold": 0.3},
    },
    "flux-taylorseer": {
        "model": "tiny-flux",
        "prompt": "a small white square",
        "steps": STEPS,
        "seed": 8,
        "guidance_scale": 3.0,
        "cache": {"method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1},
    },
    "wan-faster": {
        "model": "tiny-wan",
        "prompt": "a boat on the sea",
        "steps": STEPS,
        "seed": 9,
        "output_format": "gif",
        "cache": {
            "method": "faster_cache",
            "spatial_attention_timestep_skip_range": [-1, 1001],
            "unconditional_batch_skip_range": 2,
            "unconditional_batch_timestep_skip_range": [-1, 1001],
        },
    },
}
# Other traffic: other policies, prompts, seeds, sizes and batch sizes on both models.
OTHERS: list[dict[str, Any]] = [
    {"model": "tiny-flux", "prompt": "a cat", "steps": 4, "seed": 1, "cache": {"method": "taylorseer"}},
    {"model": "tiny-flux", "prompt": "a dog", "steps": 6, "n": 2, "cache": {"preset": "fast"}},
    {
        "model": "tiny-flux",
        "prompt": "a house",
        "steps": 5,
        "width": 32,
        "guidance_scale": 2.0,
        "cache": {"method": "faster_cache", "unconditional_batch_skip_range": 2},
    },
    {
        "model": "tiny-flux",
        "prompt": "a yellow star at the top",
        "steps": STEPS,
        "seed": 7,
        "cache": {"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 3},
    },
    {"model": "tiny-wan", "prompt": "a horse running", "steps": 4, "cache": {"method": "first_block_cache"}},
    {
        "model": "tiny-wan",
        "prompt": "a boat on the sea",
        "steps": STEPS,
        "seed": 9,
        "cache": {"preset": "balanced"},
    },
    {"model": "tiny-wan", "prompt": "rain", "steps": 3, "num_frames": 9, "cache": {"method": "taylorseer"}},
]


def _run(client: httpx.Client, body: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 200, response.text
    result = response.json()
    return b64_items(result), result["cache"]


def _run_as_job(client: httpx.Client, body: dict[str, Any]) -> tuple[list[bytes], dict[str, Any]]:
    job_id = client.post("/v1/jobs", json=body).json()["id"]
    jobs: list[dict[str, Any]] = []

    def finished() -> bool:
        jobs.append(client.get(f"/v1/jobs/{job_id}").json())
        return jobs[-1]["status"] not in ("queued", "running")

    wait_until(finished, 300, f"the end of job {job_id}")
    job = jobs[-1]
    assert job["status"] == "succeeded", job
    return b64_items(job["result"]), job["result"]["cache"]


def test_same_body_same_bytes_before_and_alongside_other_policies(server: LiveServer) -> None:
    with server.client() as client:
        # First requests on a fresh server: nothing ran before them.
        reference = {name: _run(client, body) for name, body in WATCHED.items()}
        for other in OTHERS:
            _run(client, other)
        for name, body in WATCHED.items():
            assert _run(client, body) == reference[name], f"{name} changed after other requests"

    # Alongside: every watched body twice, once through /v1/jobs, mixed with the other traffic on
    # both models, from several clients at once.
    work: list[tuple[str | None, dict[str, Any], bool]] = [(None, other, False) for other in OTHERS]
    for name, body in WATCHED.items():
        work += [(name, body, False), (name, body, True)]
    order = list(itertools.chain.from_iterable(itertools.zip_longest(work[::2], work[1::2])))

    def submit(item: tuple[str | None, dict[str, Any], bool] | None) -> tuple[str | None, Any]:
        if item is None:
            return None, None
        name, body, as_job = item
        with server.client() as client:
            return name, (_run_as_job if as_job else _run)(client, body)

    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(submit, order))
    checked = 0
    for watched, outcome in results:
        if watched is not None:
            assert outcome == reference[watched], f"{watched} changed when run alongside other requests"
            checked += 1
    assert checked == 2 * len(WATCHED)
    assert server.queue_depths() == {"tiny-flux": 0, "tiny-wan": 0}
