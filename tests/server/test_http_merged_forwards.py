"""Merged forwards through the server: requests with different policies share their transformer
forwards on one model copy, and each gets what it gets alone.

The requests are held at their first denoiser call until all of them are there (the conftest's Gate),
and the server waits for requests taken from the queue before it runs a forward (``batch_wait_ms``),
so they denoise together from their first block on, whatever the threads' timing.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from benchmarks.merged import decisions, same_decisions

from .conftest import LiveServer, b64_items, decode_image, gated, live_server, sent_together, wait_until

MAX_BATCH = 8
STEPS = 6

POLICIES: tuple[dict[str, Any] | None, ...] = (
    None,
    {"method": "first_block_cache", "threshold": 0.3},
    {"method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1},
    {"method": "pyramid_attention_broadcast", "spatial_attention_block_skip_range": 2},
    {"method": "dbcache", "residual_diff_threshold": 0.3},
    {"method": "teacache", "rel_l1_thresh": 0.4},
    {"method": "faster_cache", "spatial_attention_timestep_skip_range": [-1, 1001]},
    {"preset": "fast"},
)


def _body(index: int, policy: dict[str, Any] | None, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": "tiny-flux",
        "prompt": f"a red circle number {index}",
        "steps": STEPS,
        "seed": 40 + index,
        "guidance_scale": 3.0,
        **extra,
    }
    if policy is not None:
        body["cache"] = policy
    return body


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(
        model_cache,
        models=["tiny-flux"],
        max_batch=MAX_BATCH,
        # Long enough for every request taken from the queue to reach its first block.
        batch_wait_ms=10_000,
        queue_size=MAX_BATCH,
    )


def _pixels(response: httpx.Response) -> np.ndarray:
    return np.asarray(decode_image(b64_items(response.json())[0]), dtype=np.int16)


def test_eight_policies_merged_answer_what_each_answers_alone(server: LiveServer) -> None:
    bodies = [_body(index, policy) for index, policy in enumerate(POLICIES)]
    with server.client() as client:
        alone = [client.post("/v1/generations", json=body) for body in bodies]
    assert all(response.status_code == 200 for response in alone), [r.text for r in alone]
    # One at a time, nothing merges.
    assert all(response.json()["batch"]["largest"] == 1 for response in alone)

    together = sent_together(server, bodies)
    assert all(response.status_code == 200 for response in together), [r.text for r in together]
    for one, merged in zip(alone, together, strict=True):
        batch = merged.json()["batch"]
        assert batch["largest"] > 1 and batch["merged"] > 0 and batch["mean"] > 1
        assert same_decisions(decisions(merged.json()["cache"]), decisions(one.json()["cache"]))
        assert merged.json()["cache"]["peak_bytes"] <= one.json()["cache"]["peak_bytes"]
        # Latents within 1e-4 of the alone ones: decoded, at most a level apart here and there.
        difference = np.abs(_pixels(merged) - _pixels(one))
        assert difference.max() <= 2 and difference.mean() < 0.05
    # A real mix: the policies decided differently.
    assert len({one.json()["cache"]["blocks_computed"] for one in alone}) > 3


def test_a_cancelled_member_stops_and_the_others_finish(server: LiveServer) -> None:
    bodies = [_body(index, policy) for index, policy in enumerate(POLICIES[:3])]
    with server.client() as client:
        alone = [_pixels(client.post("/v1/generations", json=body)) for body in (bodies[0], bodies[2])]
        ids = ["stays-0", "cancelled", "stays-2"]
        with gated(server) as gate:
            for request_id in ids:
                gate.hold(request_id)
            jobs = [
                client.post("/v1/jobs", json=body, headers={"X-Request-Id": request_id}).json()
                for body, request_id in zip(bodies, ids, strict=True)
            ]
            wait_until(lambda: all(gate.waiting(request_id) for request_id in ids), what="every job held")
            for request_id in ("stays-0", "stays-2"):
                gate.allow(request_id)
            # The middle one runs two steps beside the others, then is held until it is cancelled.
            gate.allow("cancelled", 2)
            wait_until(
                lambda: gate.steps["cancelled"] == 2 and gate.waiting("cancelled"), what="held at step 3"
            )
            assert client.delete(f"/v1/jobs/{jobs[1]['id']}").status_code in (200, 202)
            gate.allow("cancelled")

            def final(job_id: str) -> dict[str, Any]:
                found: list[dict[str, Any]] = []

                def done() -> bool:
                    job = client.get(f"/v1/jobs/{job_id}").json()
                    found[:] = [job]
                    return job["status"] in ("succeeded", "failed", "cancelled")

                wait_until(done, what=f"the end of job {job_id}")
                return found[0]

            finals = [final(job["id"]) for job in jobs]
    assert [job["status"] for job in finals] == ["succeeded", "cancelled", "succeeded"]
    # Stopped within one step of its cancel.
    assert finals[1]["progress"]["step"] <= 3
    for job, expected in zip((finals[0], finals[2]), alone, strict=True):
        assert job["result"]["batch"]["merged"] > 0
        result = np.asarray(decode_image(b64_items(job["result"])[0]), dtype=np.int16)
        difference = np.abs(result - expected)
        assert difference.max() <= 2 and difference.mean() < 0.05


def test_merged_batch_sizes_are_in_the_metrics(server: LiveServer) -> None:
    with server.client() as client:
        text = client.get("/metrics").text
    counts = [
        line
        for line in text.splitlines()
        if line.startswith('ditcache_merged_batch_size_count{model="tiny-flux"}')
    ]
    assert counts and float(counts[0].split()[-1]) > 0
    assert 'ditcache_merged_batch_size_bucket{le="1.0",model="tiny-flux"}' in text


def test_a_server_running_one_at_a_time_says_nothing_merged(model_cache: Path) -> None:
    for serving in live_server(model_cache, models=["tiny-flux"]):
        with serving.client() as client:
            answer = client.post("/v1/generations", json=_body(0, None)).json()
        assert answer["batch"] is None
