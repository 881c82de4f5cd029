"""``--backend ray`` on a local Ray cluster (``ray.init(num_cpus=2)``): two replicas of tiny-flux behind
the ingress, sharing one job store.

The same bytes as the in-process server with one replica for the same body and seed; the app's errors
and headers; a job created, followed, fetched and cancelled through the ingress; one replica killed
during a load run, after which every request has been answered (200, or the 503 envelope), the job it
was running is run again by the other replica to the same bytes, and the server still serves.

Which replica Ray's router picks is its own choice, so no test here waits for a particular one: that
a replica answers for the jobs of another is held by two in-process servers on one store
(``test_http_jobs_restart``), and after the kill only the other replica is left to answer. Which
replica answered is in each answer's ``X-Replica`` header (the Ray actor's name). Needs the ``ray``
extra.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.settings import LimitOverrides

from .conftest import LiveServer, b64_items, error_of, live_server, wait_until

ray = pytest.importorskip("ray", reason="the ray extra is not installed: pip install -e '.[ray]'")
serve = pytest.importorskip("ray.serve")

pytestmark = pytest.mark.slow

BODY = {"model": "tiny-flux", "prompt": "a red cat", "seed": 5, "steps": 3, "width": 32, "height": 32}
# Short, so that the job of a killed replica runs again soon; long enough for a busy replica's heartbeat.
OWNER_TIMEOUT_S = 5.0
# Long jobs, so that one is still running when it is cancelled or its replica is killed.
LIMITS = {"tiny-flux": LimitOverrides(max_steps=1000)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def single(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache, models=["tiny-flux"], torch_threads=1, model_limits=LIMITS)


@pytest.fixture(scope="module")
def ray_url(model_cache: Path, single: LiveServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    # ``single`` first: it builds tiny-flux into the model cache, which both replicas then load.
    from server import ray_backend
    from server.settings import Settings

    port = _free_port()
    settings = Settings(
        models=["tiny-flux"],
        cache_dir=model_cache,
        host="127.0.0.1",
        port=port,
        torch_threads=1,
        backend="ray",
        replicas=2,
        ray_num_cpus=1,
        job_store=f"sqlite:{tmp_path_factory.mktemp('ray-jobs') / 'jobs.sqlite'}",
        job_owner_timeout_s=OWNER_TIMEOUT_S,
        shutdown_grace_s=2.0,
        model_limits=LIMITS,
        log_level="warning",
    )
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        ray_backend.start(settings)
        base_url = f"http://127.0.0.1:{port}"
        with httpx.Client(base_url=base_url, timeout=30) as client:

            def ready() -> bool:
                try:
                    return client.get("/ready").status_code == 200
                except httpx.TransportError:
                    return False

            wait_until(ready, 300, "a ready Ray Serve application")
            # Both replicas up: Ray routes to a replica only once its constructor has returned.
            wait_until(lambda: len(_replicas()) == 2, 120, "two replicas")
        yield base_url
    finally:
        serve.shutdown()
        ray.shutdown()


def _replicas() -> list[str]:
    """The names of the live ditcache replica actors (a killed actor leaves the name registry)."""
    return sorted(
        actor["name"]
        for actor in ray.util.list_named_actors(all_namespaces=True)
        if actor["name"].startswith("SERVE_REPLICA::ditcache#ditcache#")
    )


@pytest.fixture
def client(ray_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=ray_url, timeout=120) as client:
        yield client


def _reference(single: LiveServer, body: dict[str, Any]) -> list[bytes]:
    with single.client() as client:
        return b64_items(client.post("/v1/generations", json=body).json())


def test_same_bytes_as_one_replica_whichever_answers(client: httpx.Client, single: LiveServer) -> None:
    bodies = [{**BODY, "seed": seed} for seed in range(8)]
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda body: client.post("/v1/generations", json=body), bodies))
    assert [answer.status_code for answer in answers] == [200] * 8
    assert {answer.headers["x-replica"] for answer in answers} <= set(_replicas())
    for body, answer in zip(bodies, answers, strict=True):
        assert b64_items(answer.json()) == _reference(single, body)


def test_the_apps_errors_and_headers(client: httpx.Client, single: LiveServer) -> None:
    refused = client.post(
        "/v1/generations", json={**BODY, "cache": {"method": "nope"}}, headers={"X-Request-Id": "mine"}
    )
    assert refused.status_code == 422 and error_of(refused)["param"] == "cache.method"
    assert refused.headers.get_list("x-request-id") == ["mine"]
    missing = client.get("/v1/jobs/job_missing")
    assert missing.status_code == 404 and error_of(missing)["code"] == "not_found"
    raw = client.post("/v1/generations", json=BODY, headers={"Accept": "image/png"})
    assert raw.status_code == 200 and raw.headers["content-type"] == "image/png"
    assert raw.headers["x-seed"] == str(BODY["seed"]) and "denoising" in raw.headers["server-timing"]
    assert [raw.content] == _reference(single, BODY)
    assert client.get("/health").json() == {"status": "ok"}
    assert "ditcache_generations_total" in client.get("/metrics").text


def _events(client: httpx.Client, job_id: str, until: str) -> list[tuple[str, dict[str, Any]]]:
    seen: list[tuple[str, dict[str, Any]]] = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events") as response:
        assert response.status_code == 200
        name = ""
        for line in response.iter_lines():
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                seen.append((name, json.loads(line.removeprefix("data: "))))
                if name == until:
                    break
    return seen


def test_a_job_is_followed_fetched_and_cancelled_through_the_ingress(client: httpx.Client) -> None:
    body = {**BODY, "steps": 1000}
    created = client.post("/v1/jobs", json=body)
    assert created.status_code == 202
    job_id = created.json()["id"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1, 60, "a running job")
    view = client.get(f"/v1/jobs/{job_id}")
    assert view.json()["status"] == "running" and view.headers["x-replica"] in _replicas()
    followed = _events(client, job_id, until="progress")
    assert [name for name, _ in followed][-1] == "progress"
    cancel = client.delete(f"/v1/jobs/{job_id}")
    assert cancel.status_code == 202
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled", 30, "cancelled")
    ended = client.get(f"/v1/jobs/{job_id}").json()
    assert ended["error"]["code"] == "cancelled" and ended["progress"]["step"] < body["steps"]


def test_a_killed_replica_loses_no_request_and_no_job(client: httpx.Client, single: LiveServer) -> None:
    job_body = {**BODY, "steps": 300, "seed": 77}
    created = client.post("/v1/jobs", json=job_body)
    job_id, owner = created.json()["id"], created.headers["x-replica"]
    wait_until(lambda: client.get(f"/v1/jobs/{job_id}").json()["progress"]["step"] >= 1, 60, "a running job")
    bodies = [{**BODY, "seed": 100 + index} for index in range(16)]
    with ThreadPoolExecutor(4) as pool:
        answers = [pool.submit(client.post, "/v1/generations", json=body) for body in bodies]
        wait_until(lambda: sum(answer.done() for answer in answers) >= 2, 120, "the load under way")
        ray.kill(ray.get_actor(owner, namespace="serve"), no_restart=True)
        killed_at = time.monotonic()
        results = [answer.result(timeout=180) for answer in answers]
    for body, answer in zip(bodies, results, strict=True):
        if answer.status_code == 200:
            assert b64_items(answer.json()) == _reference(single, body)
        else:
            assert answer.status_code == 503 and error_of(answer)["code"] == "unavailable", answer.text
    assert sum(answer.status_code == 200 for answer in results) >= len(bodies) // 2
    # The job its replica was running: run again by the other one, to the same bytes.
    wait_until(
        lambda: client.get(f"/v1/jobs/{job_id}").json()["status"] not in ("queued", "running"),
        180,
        "the job of the killed replica",
    )
    job = client.get(f"/v1/jobs/{job_id}").json()
    assert job["status"] == "succeeded", job
    assert b64_items(job["result"]) == _reference(single, job_body)
    assert time.monotonic() - killed_at < 180
    # Still serving, and Ray brings the replica count back.
    assert client.post("/v1/generations", json=BODY).status_code == 200
    wait_until(lambda: len(_replicas()) == 2, 180, "a replacement replica")


# -- the deployment recipes (read here: no Kubernetes, no Docker engine) ----------------------------------

ROOT = Path(__file__).resolve().parents[2]


def test_the_rayservice_deploys_this_app_on_gpu_workers_with_probes() -> None:
    import importlib

    import yaml

    from server import ray_backend
    from server.settings import load_settings

    service, *others = yaml.safe_load_all((ROOT / "docker" / "ray-service.yaml").read_text())
    assert service["kind"] == "RayService" and {"PersistentVolumeClaim", "Service"} <= {
        o["kind"] for o in others
    }
    (application,) = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]
    module, _, name = application["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    assert builder is ray_backend.app_builder
    settings = load_settings(**application["args"])
    assert (
        settings.cache_dir == Path("/models")
        and settings.job_store
        and settings.job_store.startswith("redis://")
    )
    assert settings.job_store.split("//")[1].split(":")[0] in {o["metadata"]["name"] for o in others}
    deployments = {deployment["name"]: deployment for deployment in application["deployments"]}
    assert set(deployments) == {ray_backend.REPLICA_DEPLOYMENT, ray_backend.INGRESS_DEPLOYMENT}
    replicas = deployments[ray_backend.REPLICA_DEPLOYMENT]
    assert replicas["ray_actor_options"]["num_gpus"] == 1
    bounds = replicas["autoscaling_config"]
    assert 1 <= bounds["min_replicas"] <= bounds["max_replicas"]
    (gpu_group,) = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert gpu_group["maxReplicas"] >= bounds["max_replicas"]
    pod = gpu_group["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert {"name": "models", "mountPath": "/models"} in container["volumeMounts"]
    assert any(volume["name"] == "models" for volume in pod["volumes"])
    # The builder makes the application from those args without a cluster.
    assert type(builder(application["args"])).__name__ == "Application"


def test_the_multi_gpu_compose_file_reserves_every_gpu_and_keeps_jobs_in_the_volume(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import yaml

    from server.settings import load_settings

    compose = yaml.safe_load((ROOT / "docker" / "compose.multi-gpu.yaml").read_text())
    service = compose["services"]["ditcache"]
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["count"] == "all"
    assert "models:/models" in service["volumes"]
    environment = dict(service["environment"])
    # ${VAR:-default}: what compose passes when the variable is not set.
    environment["DITCACHE_DEVICE"] = environment["DITCACHE_DEVICE"].split(":-", 1)[1].rstrip("}")
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    settings = load_settings()
    assert len(settings.device) >= 2 and all(device.startswith("cuda:") for device in settings.device)
    assert settings.job_store == "sqlite:/models/jobs.sqlite"
    assert (ROOT / "docker" / "ray.Dockerfile").read_text().count("ray[serve]") == 1
