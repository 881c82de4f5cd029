"""Asynchronous jobs: queued, running with progress events, done with a result; cancel; bounds.

Where a test needs a job still running or still queued, a Gate holds it at the denoiser until the
test has checked what it must: nothing depends on how long a generation takes on this machine.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import LiveServer, b64_items, decode_image, error_of, gated, live_server, wait_until

# Many steps, so that a cancel that did not stop it would show; held by a Gate, it runs only a few.
LONG = {"model": "tiny-flux", "prompt": "a slow one", "steps": 100, "seed": 1}
SHORT = {"model": "tiny-flux", "prompt": "a red circle", "steps": 4, "seed": 2}
QUEUE_SIZE = 2
MAX_FINISHED = 4


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(
        model_cache, models=["tiny-flux"], queue_size=QUEUE_SIZE, max_finished_jobs=MAX_FINISHED
    )


def events(client: httpx.Client, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """(event name, job) for each server-sent event, until the stream ends."""
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                yield name, json.loads(line.removeprefix("data: "))


def wait_final(client: httpx.Client, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
    final: list[dict[str, Any]] = []

    def finished() -> bool:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        final[:] = [job]
        return job["status"] not in ("queued", "running")

    wait_until(finished, timeout, f"the end of job {job_id}")
    return final[0]


def test_lifecycle_progress_and_cancel(server: LiveServer, client: httpx.Client) -> None:
    with gated(server) as gate:
        # One step, then held: running, with progress, until the test cancels it.
        gate.hold("long", after=1)
        # Held at its first step, until the job behind it has been seen moving up.
        gate.hold("first")
        created = client.post("/v1/jobs", json=LONG, headers={"X-Request-Id": "long"})
        assert created.status_code == 202
        long_id = created.json()["id"]
        assert created.headers["location"] == f"/v1/jobs/{long_id}"
        assert created.json()["request_id"] == created.headers["x-request-id"] == "long"
        assert created.json()["seed"] == LONG["seed"]

        long_events = events(server.client(), long_id)
        # The stream opens on whatever the job is now ("queued" or "running"), then reports each change.
        for _, job in long_events:
            if job["progress"]["step"] >= 1:
                break
        assert job["status"] == "running" and job["progress"] == {"step": 1, "total_steps": 100}

        # The worker is busy: the next two wait in the queue, in order; the queue then is full.
        first = {**SHORT, "steps": 6}
        queued = client.post("/v1/jobs", json=first, headers={"X-Request-Id": "first"}).json()
        dropped = client.post("/v1/jobs", json={**SHORT, "seed": 3}).json()
        assert (queued["status"], queued["queue_position"]) == ("queued", 0)
        assert (dropped["status"], dropped["queue_position"]) == ("queued", 1)
        full = client.post("/v1/jobs", json=SHORT)
        assert full.status_code == 429 and error_of(full)["code"] == "queue_full"
        assert full.headers["retry-after"] == "1"

        # A queued job is cancelled at once, and its place is free again.
        cancelled = client.delete(f"/v1/jobs/{dropped['id']}")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
        assert client.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 0
        behind = client.post("/v1/jobs", json={**SHORT, "seed": 4}).json()
        assert behind["queue_position"] == 1

        seen: dict[str, list[tuple[str, dict[str, Any]]]] = {queued["id"]: [], behind["id"]: []}
        first_seen = {job_id: threading.Event() for job_id in seen}

        def watch(job_id: str) -> None:
            with server.client() as watcher:
                for item in events(watcher, job_id):
                    seen[job_id].append(item)
                    first_seen[job_id].set()

        watching = [threading.Thread(target=watch, args=(job_id,)) for job_id in seen]
        for thread in watching:
            thread.start()
        assert all(event.wait(60) for event in first_seen.values())

        # A running job stops within one step of the cancel: it was held at the start of its second
        # step when cancelled, and may run that step only.
        assert gate.waiting("long")
        stop = client.delete(f"/v1/jobs/{long_id}")
        assert stop.status_code == 202
        steps_at_cancel = stop.json()["progress"]["step"]
        gate.allow("long")
        name, job = list(long_events)[-1]
        assert name == "cancelled" and job["status"] == "cancelled"
        assert job["error"]["code"] == "cancelled" and job["result"] is None
        assert steps_at_cancel <= job["progress"]["step"] <= steps_at_cancel + 1 < 100
        assert gate.steps["long"] == steps_at_cancel + 1

        # The next job starts (and is held): the one behind it moves up to the head of the queue.
        wait_until(
            lambda: any(name == "queued" and job["queue_position"] == 0 for name, job in seen[behind["id"]]),
            what="the job behind at position 0",
        )
        gate.allow("first")

    # ... and the worker takes the next jobs, in order.
    for thread in watching:
        thread.join(120)
        assert not thread.is_alive(), "an event stream did not end"
    results = []
    for job_id, stream in seen.items():
        names = [name for name, _ in stream]
        assert names[0] == "queued" and names[-1] == "succeeded"
        assert names.count("running") == 1
        running_at = names.index("running")
        assert set(names[:running_at]) == {"queued"} and set(names[running_at + 1 : -1]) <= {"progress"}
        # Steps only go up; events may merge steps that came faster than the stream was read.
        total = first["steps"] if job_id == queued["id"] else SHORT["steps"]
        steps = [job["progress"]["step"] for _, job in stream[running_at:-1]]
        assert steps == sorted(set(steps)) and steps[-1] <= total
        done = stream[-1][1]
        assert done["progress"] == {"step": total, "total_steps": total} and done["queue_position"] is None
        assert client.get(f"/v1/jobs/{job_id}").json() == done
        (image,) = b64_items(done["result"])
        assert decode_image(image).size == (64, 64)
        results.append((done["started"], image))
    positions = [job["queue_position"] for name, job in seen[behind["id"]] if name == "queued"]
    assert positions == [1, 0], "the job behind moved up when the one ahead started"
    assert results[0][0] < results[1][0]
    # The cancelled job left nothing behind: the same body run now gives the same bytes.
    assert b64_items(client.post("/v1/generations", json=first).json()) == [results[0][1]]

    finished = client.delete(f"/v1/jobs/{queued['id']}")
    assert finished.status_code == 409 and error_of(finished)["code"] == "conflict"
    assert server.queue_depths() == {"tiny-flux": 0}


def test_events_of_a_finished_job_end_at_once(client: httpx.Client) -> None:
    job_id = client.post("/v1/jobs", json=SHORT).json()["id"]
    final = wait_final(client, job_id)
    assert list(events(client, job_id)) == [("succeeded", final)]


def test_unknown_jobs_are_404(client: httpx.Client) -> None:
    for response in (
        client.get("/v1/jobs/job_missing"),
        client.get("/v1/jobs/job_missing/events"),
        client.delete("/v1/jobs/job_missing"),
    ):
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"


def test_finished_jobs_are_kept_up_to_the_bound(client: httpx.Client) -> None:
    ids = []
    for seed in range(MAX_FINISHED + 2):
        job_id = client.post("/v1/jobs", json={**SHORT, "steps": 1, "seed": seed}).json()["id"]
        assert wait_final(client, job_id)["status"] == "succeeded"
        ids.append(job_id)
    # Waited for too: were it still running, whether it finished before the reads below would
    # decide how many of the others are evicted.
    last = client.post("/v1/jobs", json={**SHORT, "steps": 1})
    assert wait_final(client, last.json()["id"])["status"] == "succeeded"
    kept = [client.get(f"/v1/jobs/{job_id}").status_code for job_id in ids]
    assert kept[:3] == [404, 404, 404] and set(kept[3:]) == {200}


def test_a_failed_job_reports_the_error(server: LiveServer, client: httpx.Client) -> None:
    # A fake, because nothing a client can send makes the pipeline raise: the VAE decode fails as
    # an out-of-memory would.
    generations = server.runtime.generations
    assert generations is not None
    vae = generations.models["tiny-flux"].pipeline.vae

    def out_of_memory(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("CUDA out of memory (simulated)")

    vae.decode = out_of_memory
    try:
        job = wait_final(client, client.post("/v1/jobs", json=SHORT).json()["id"])
    finally:
        del vae.decode
    assert job["status"] == "failed" and job["result"] is None
    assert job["error"]["code"] == "generation_failed"
    assert wait_final(client, client.post("/v1/jobs", json=SHORT).json()["id"])["status"] == "succeeded"


def test_a_client_that_goes_away_cancels_its_generation(server: LiveServer, client: httpx.Client) -> None:
    generations = server.runtime.generations
    assert generations is not None
    worker = generations.workers["tiny-flux"]
    cancelled = {"model": "tiny-flux", "method": "none", "outcome": "GenerationCancelled"}

    def count() -> float:
        # None until the first such generation creates the labelled sample.
        value = generations.metrics.registry.get_sample_value("ditcache_generations_total", cancelled)
        return value or 0.0

    # Seen from the worker's side: the server asked it to cancel, which it does only when the client left.
    asked_to_cancel = threading.Event()
    original_cancel = worker.cancel

    def cancel(*args: Any, **kwargs: Any) -> bool:
        asked_to_cancel.set()
        return original_cancel(*args, **kwargs)

    before = count()
    worker.cancel = cancel  # type: ignore[method-assign]
    try:
        with gated(server) as gate:
            gate.hold("impatient")
            with (
                server.client(timeout=httpx.Timeout(120.0, read=0.5)) as impatient,
                pytest.raises(httpx.ReadTimeout),
            ):
                impatient.post("/v1/generations", json=LONG, headers={"X-Request-Id": "impatient"})
            assert asked_to_cancel.wait(60), "the server did not notice the client went away"
            gate.allow("impatient")
            wait_until(lambda: count() == before + 1, 120, "the cancelled generation")
            # Held at its first step until the cancel came: it stopped at the end of that step.
            assert gate.steps["impatient"] == 1
    finally:
        del worker.cancel
    assert server.queue_depths() == {"tiny-flux": 0}
    assert client.post("/v1/generations", json=SHORT).status_code == 200
