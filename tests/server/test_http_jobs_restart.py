"""Jobs outlive their server: ``ditcache serve`` killed (SIGKILL) with jobs finished, running and queued,
then started again on the same job store, with none of them lost.

The first server runs with its denoiser slowed for the requests named ``slow-*`` (a global forward
pre-hook, installed before the server loads its model), so that the running job is still running
and the queued one still queued when the kill comes, however fast the machine. The second server
runs plainly: what it runs again must give the same bytes as a plain request with the same body
and seed. Orphans that cannot run again (their model is gone, they took the server down too often,
their deadline passed) end ``failed`` with the reason.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.runtime.job_store import JobRecord, JobStore, open_store
from server.runtime.jobs import MAX_RUNS
from server.settings import Settings

from .conftest import LiveServer, b64_items, error_of, gated, wait_until
from .test_job_store import redis_url

__all__ = ["redis_url"]

ROOT = Path(__file__).parents[2]
OWNER_TIMEOUT_S = 2.0
# Each denoiser call of a slow-* request waits this long in the first server.
SLOW_CALL_S = 0.15
SLOWED_SERVE = f"""
import sys, time
import torch
from diffusers.models.modeling_utils import ModelMixin
from server.cli import main
from server.logs import request_id_var

def slow(module, args):
    if isinstance(module, ModelMixin) and "Transformer" in type(module).__name__:
        request_id = request_id_var.get()
        if request_id is not None and request_id.startswith("slow"):
            time.sleep({SLOW_CALL_S})

torch.nn.modules.module.register_module_forward_pre_hook(slow)
sys.exit(main())
"""

FINISHED = {"model": "tiny-flux", "prompt": "done before the kill", "steps": 2, "seed": 1}
RUNNING = {"model": "tiny-flux", "prompt": "running at the kill", "steps": 60, "seed": 2}
QUEUED = {"model": "tiny-flux", "prompt": "queued at the kill", "steps": 3, "seed": 3}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Served:
    """``ditcache serve`` in a subprocess."""

    def __init__(self, model_cache: Path, store_url: str, *, slowed: bool) -> None:
        self.port = _free_port()
        launcher = ["-c", SLOWED_SERVE] if slowed else ["-m", "server"]
        command = [
            sys.executable, *launcher, "serve", "--model", "tiny-flux", "--port", str(self.port),
            "--cache-dir", str(model_cache), "--job-store", store_url,
            "--job-owner-timeout-s", str(OWNER_TIMEOUT_S), "--torch-threads", "1", "--log-level", "warning",
            "--shutdown-grace-s", "1",
        ]  # fmt: skip
        env = {**os.environ, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen(
            command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=120)

        def ready() -> bool:
            if self.process.poll() is not None:
                stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                raise AssertionError(f"the server exited early: {stderr[-2000:]}")
            try:
                return self.client.get("/ready").status_code == 200
            except httpx.TransportError:
                return False

        wait_until(ready, 180, "a ready server")

    def job(self, job_id: str) -> dict[str, Any]:
        response = self.client.get(f"/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def final(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        wait_until(
            lambda: self.job(job_id)["status"] not in ("queued", "running"), timeout, f"the end of {job_id}"
        )
        return self.job(job_id)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self.client.close()

    def stop(self) -> None:
        self.client.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


@pytest.fixture(params=["sqlite", "redis"])
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:{tmp_path / 'jobs.sqlite'}"
        return
    url: str = request.getfixturevalue("redis_url")
    # Its own database on the session's server: nothing left by another test is seen as an orphan.
    yield url.rsplit("/", 1)[0] + "/5"
    import redis

    redis.Redis.from_url(url.rsplit("/", 1)[0] + "/5").flushdb()


def _orphan(store: JobStore, job_id: str, body: dict[str, Any], **fields: Any) -> None:
    import json

    store.create(
        JobRecord(
            id=job_id,
            status="running",
            model=body["model"],
            request_id=f"req-{job_id}",
            seed=body["seed"],
            created=time.time(),
            total_steps=body["steps"],
            body=json.dumps(body),
            owner="a-server-that-died",
            **fields,
        )
    )


@pytest.mark.slow
def test_a_killed_server_loses_no_job(model_cache: Path, store_url: str) -> None:
    first = Served(model_cache, store_url, slowed=True)
    try:
        finished_id = first.client.post("/v1/jobs", json=FINISHED).json()["id"]
        finished = first.final(finished_id)
        assert finished["status"] == "succeeded"
        running_id = first.client.post(
            "/v1/jobs", json=RUNNING, headers={"X-Request-Id": "slow-running"}
        ).json()["id"]
        wait_until(lambda: first.job(running_id)["progress"]["step"] >= 1, 60, "a running job")
        queued = first.client.post("/v1/jobs", json=QUEUED, headers={"X-Request-Id": "slow-queued"}).json()
        assert (queued["status"], queued["queue_position"]) == ("queued", 0)
        # Its deadline passes while no server runs it.
        late = first.client.post(
            "/v1/jobs",
            json={**QUEUED, "seed": 4},
            headers={"X-Request-Id": "slow-late", "X-Request-Timeout": "1"},
        ).json()
        assert first.job(running_id)["status"] == "running"
    finally:
        first.kill()

    store = open_store(store_url, model_cache)
    try:
        _orphan(store, "job_model_gone", {**QUEUED, "model": "not-served-any-more"})
        _orphan(store, "job_crashes_its_server", QUEUED, attempts=MAX_RUNS)
    finally:
        store.close()

    second = Served(model_cache, store_url, slowed=False)
    try:
        # Finished: there at once, as it was.
        assert second.job(finished_id) == finished
        # Running and queued: run again once their owner is known dead, to the same bytes as a plain request.
        for job_id, body in ((running_id, RUNNING), (queued["id"], QUEUED)):
            job = second.final(job_id)
            assert job["status"] == "succeeded", job
            assert job["progress"] == {"step": body["steps"], "total_steps": body["steps"]}
            plain = second.client.post("/v1/generations", json=body)
            assert b64_items(job["result"]) == b64_items(plain.json())
        expected = {
            late["id"]: "deadline_exceeded",
            "job_model_gone": "model_not_found",
            "job_crashes_its_server": "unavailable",
        }
        for job_id, code in expected.items():
            job = second.final(job_id)
            assert (job["status"], job["error"]["code"]) == ("failed", code), job
            assert job["error"]["message"]
    finally:
        second.stop()


def test_two_servers_on_one_store_answer_for_each_others_jobs(model_cache: Path, tmp_path: Path) -> None:
    """A job created through one server is followed, fetched and cancelled through another; the cancel
    reaches the worker that runs it within one step."""
    url = f"sqlite:{tmp_path / 'jobs.sqlite'}"
    owner = LiveServer(
        Settings(cache_dir=model_cache, models=["tiny-flux"], job_store=url, shutdown_grace_s=2)
    )
    other = LiveServer(
        Settings(cache_dir=model_cache, models=["tiny-flux"], job_store=url, shutdown_grace_s=2)
    )
    owner.start()
    other.start()
    try:
        with gated(owner) as gate, owner.client() as here, other.client() as there:
            gate.hold("shared", after=1)
            job = here.post(
                "/v1/jobs", json={**RUNNING, "steps": 100}, headers={"X-Request-Id": "shared"}
            ).json()
            wait_until(lambda: gate.waiting("shared"), 60, "the job held at its second step")
            queued = here.post("/v1/jobs", json=QUEUED).json()
            assert queued["queue_position"] == 0

            seen = there.get(f"/v1/jobs/{job['id']}").json()
            assert (seen["status"], seen["progress"]["step"]) == ("running", 1)
            assert there.get(f"/v1/jobs/{queued['id']}").json()["queue_position"] == 0
            with there.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
                first = next(line for line in stream.iter_lines() if line.startswith("event: "))
            assert first == "event: running"

            # Queued on the owner, cancelled through the other: ended at once, and off the owner's queue.
            dropped = there.delete(f"/v1/jobs/{queued['id']}")
            assert dropped.status_code == 200 and dropped.json()["status"] == "cancelled"
            assert here.get(f"/v1/jobs/{queued['id']}").json()["status"] == "cancelled"
            wait_until(lambda: owner.queue_depths() == {"tiny-flux": 0}, 10, "the owner's queue emptied")

            # Running on the owner, cancelled through the other: it stops at the end of the step it is in.
            stop = there.delete(f"/v1/jobs/{job['id']}")
            assert stop.status_code == 202 and stop.json()["status"] == "running"
            gate.allow("shared")
            wait_until(
                lambda: there.get(f"/v1/jobs/{job['id']}").json()["status"] == "cancelled", 30, "cancelled"
            )
            assert gate.steps["shared"] == 2
            ended = there.get(f"/v1/jobs/{job['id']}").json()
            assert ended == here.get(f"/v1/jobs/{job['id']}").json()
            assert ended["error"]["code"] == "cancelled" and ended["progress"]["step"] == 2
            again = there.delete(f"/v1/jobs/{job['id']}")
            assert again.status_code == 409 and error_of(again)["code"] == "conflict"
    finally:
        other.stop()
        owner.stop()
