"""A real server for the HTTP tests: uvicorn on a loopback port, the app started with its lifespan.

Each test module that needs one builds it once (module scope); the built-in models are built once
per session into a shared folder, so a module only pays for loading them.
"""

from __future__ import annotations

import base64
import io
import math
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import imageio_ffmpeg
import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from server.api.app import create_app
from server.logs import request_id_var
from server.runtime.state import Runtime
from server.settings import Settings

_READY_TIMEOUT_S = 300.0


class LiveServer:
    """The app behind uvicorn in a thread; ``client()`` talks to it over real HTTP."""

    def __init__(self, settings: Settings) -> None:
        self.app = create_app(settings)
        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.bind(("127.0.0.1", 0))
        self.base_url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", lifespan="on"))
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._socket]}, daemon=True
        )

    @property
    def runtime(self) -> Runtime:
        runtime: Runtime = self.app.state.runtime
        return runtime

    def client(self, **kwargs: Any) -> httpx.Client:
        kwargs.setdefault("timeout", 120.0)
        return httpx.Client(base_url=self.base_url, **kwargs)

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        with self.client() as client:
            while time.monotonic() < deadline:
                try:
                    if client.get("/ready").status_code == 200:
                        return
                except httpx.TransportError:
                    pass
                if self.runtime.state == "failed":
                    raise RuntimeError(f"the server failed to load its models: {self.runtime.error}")
                time.sleep(0.05)
        raise TimeoutError("the server did not become ready")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(60)

    def queue_depths(self) -> dict[str, int]:
        generations = self.runtime.generations
        assert generations is not None
        return {name: worker.queue_depth for name, worker in generations.workers.items()}


@pytest.fixture(scope="session")
def model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("models")


def live_server(model_cache: Path, **settings: Any) -> Iterator[LiveServer]:
    """Body of a module-scoped fixture: a started server, stopped afterwards."""
    # A short grace: a module's leftover queued jobs should not hold its teardown for long.
    settings.setdefault("shutdown_grace_s", 2.0)
    # The random-weight models: their outputs are pinned bit for bit; the trained default has its own tests.
    settings.setdefault("models", ["tiny-flux", "tiny-wan"])
    server = LiveServer(Settings(cache_dir=model_cache, **settings))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def one_thread_server(model_cache: Path, **settings: Any) -> Iterator[LiveServer]:
    """``live_server`` with one torch thread, for the server and a test's direct calls alike (it is the
    process's setting: another count may sum in another order and move the last bit); the thread count
    is restored after."""
    threads = torch.get_num_threads()
    try:
        yield from live_server(model_cache, torch_threads=1, **settings)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def server(model_cache: Path) -> Iterator[LiveServer]:
    yield from live_server(model_cache)


@pytest.fixture(scope="module")
def client(server: LiveServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


# -- waiting, and holding the worker ---------------------------------------------------------------------


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "condition") -> None:
    """Poll ``condition`` until it holds; fail the test, rather than hang it, past ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} not reached within {timeout} s"
        time.sleep(0.01)


class Gate:
    """Holds chosen requests at their model's denoiser until the test lets them go.

    A held request has been taken by its worker and waits at the start of a known denoising step,
    however fast the machine, so a test can check what holds while it runs instead of hoping it is
    still running. Requests are told apart by the id the worker binds for its task (the client's
    X-Request-Id); a step starts at the first denoiser call with a new timestep, so that the calls
    of one step (one per CFG branch, where a pipeline makes two) are never split.
    """

    def __init__(self, timeout_s: float = 60.0) -> None:
        self._condition = threading.Condition()
        self._budget: dict[str, float] = {}
        self._timestep: dict[str, float | None] = {}
        self._waiting: set[str] = set()
        self._timeout_s = timeout_s
        # Steps each held request was let start.
        self.steps: dict[str, int] = {}

    def hold(self, request_id: str, *, after: int = 0) -> None:
        """Let ``request_id`` run ``after`` steps, then hold it at the start of the next one."""
        with self._condition:
            self._budget[request_id] = after
            self.steps.setdefault(request_id, 0)

    def allow(self, request_id: str, steps: float = math.inf) -> None:
        """Let ``request_id`` start ``steps`` more steps (all it wants, by default)."""
        with self._condition:
            self._budget[request_id] += steps
            self._condition.notify_all()

    def open_all(self) -> None:
        with self._condition:
            for request_id in self._budget:
                self._budget[request_id] = math.inf
            self._condition.notify_all()

    def waiting(self, request_id: str) -> bool:
        with self._condition:
            return request_id in self._waiting

    def __call__(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        """The denoiser's forward pre-hook: runs on the worker thread, where the task's id is bound."""
        request_id = request_id_var.get()
        with self._condition:
            if request_id is None or request_id not in self._budget:
                return
            timestep = kwargs.get("timestep")
            value = float(timestep.flatten()[0]) if isinstance(timestep, torch.Tensor) else None
            if request_id in self._timestep and value == self._timestep[request_id]:
                return  # another call of a step already let start
            self._waiting.add(request_id)
            try:
                let_go = self._condition.wait_for(lambda: self._budget[request_id] >= 1, self._timeout_s)
            finally:
                self._waiting.discard(request_id)
            # Fail the held generation, rather than hang the run, if a test never lets it go.
            if not let_go:
                raise TimeoutError(f"request {request_id} was held {self._timeout_s} s and never let go")
            self._budget[request_id] -= 1
            self.steps[request_id] += 1
            self._timestep[request_id] = value


@contextmanager
def gated(server: LiveServer, model: str = "tiny-flux") -> Iterator[Gate]:
    """A Gate on ``model``'s denoiser for the block; every request still held is let go at its end."""
    generations = server.runtime.generations
    assert generations is not None
    gate = Gate()
    transformer = generations.models[model].pipeline.transformer
    handle = transformer.register_forward_pre_hook(gate, with_kwargs=True)
    try:
        yield gate
    finally:
        gate.open_all()
        handle.remove()


@contextmanager
def patient_batchers(server: LiveServer, model: str, wait_s: float = 600.0) -> Iterator[None]:
    """``model``'s forward batchers, for the block, wait ``wait_s`` for every request they wait for: one
    busy between forwards (``stall_s``) and one admitted that has not reached its first (``wait_s``).

    Requests let go together still wake when the machine schedules their threads: on a busy one, a thread
    can take longer than the batcher's waits to reach its next forward, and the others would run on
    without it, out of step for the rest of the run. Waiting that out keeps a test's merging down to the
    requests' policies alone. (A request held up on purpose is tested in the engine, at the default.)
    """
    generations = server.runtime.generations
    assert generations is not None
    batchers = [
        replica.worker.batcher
        for replica in generations.replicas[model]
        if replica.worker.batcher is not None
    ]
    assert batchers, f"{model} does not merge forwards"
    defaults = [(batcher.wait_s, batcher.stall_s) for batcher in batchers]
    for batcher in batchers:
        batcher.wait_s = batcher.stall_s = wait_s
    try:
        yield
    finally:
        for batcher, (wait, stall) in zip(batchers, defaults, strict=True):
            batcher.wait_s, batcher.stall_s = wait, stall


def sent_together(
    server: LiveServer, bodies: list[dict[str, Any]], model: str = "tiny-flux"
) -> list[httpx.Response]:
    """``bodies`` posted to /v1/generations at once, each held at its first denoiser call until all of
    them are there: on a server merging forwards (with ``batch_wait_ms``), they denoise together."""
    ids = [f"together-{index}" for index in range(len(bodies))]
    with (
        patient_batchers(server, model),
        gated(server, model) as gate,
        ThreadPoolExecutor(len(bodies)) as pool,
    ):
        for request_id in ids:
            gate.hold(request_id)

        def send(index: int) -> httpx.Response:
            with server.client() as client:
                return client.post(
                    "/v1/generations", json=bodies[index], headers={"X-Request-Id": ids[index]}
                )

        futures = [pool.submit(send, index) for index in range(len(bodies))]
        wait_until(lambda: all(gate.waiting(request_id) for request_id in ids), what="every request held")
        gate.open_all()
        return [future.result() for future in futures]


# -- decoding what came back ---------------------------------------------------------------------------


def b64_items(body: dict[str, Any]) -> list[bytes]:
    return [base64.b64decode(item["b64_json"]) for item in body["data"]]


def pixels_of(answer: dict[str, Any]) -> np.ndarray:
    """The one image of a JSON answer, as RGB pixels."""
    (item,) = b64_items(answer)
    with Image.open(io.BytesIO(item)) as image:
        return np.asarray(image.convert("RGB"))


def decode_image(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def decode_video(data: bytes, fmt: str) -> tuple[tuple[int, int], int]:
    """((width, height), frame count) of an encoded video."""
    if fmt == "mp4":
        with tempfile.NamedTemporaryFile(suffix=".mp4") as file:
            file.write(data)
            file.flush()
            frames = imageio_ffmpeg.read_frames(file.name)
            meta = next(frames)
            width, height = meta["size"]
            return (width, height), sum(1 for _ in frames)
    image = Image.open(io.BytesIO(data))
    return image.size, getattr(image, "n_frames", 1)


def generated(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    """The answer to ``POST /v1/generations`` with ``body``, which must succeed."""
    response = client.post("/v1/generations", json=body)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def error_of(response: httpx.Response) -> dict[str, Any]:
    """The error envelope, after checking it has exactly the documented shape."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert {"code", "message", "request_id"} <= set(error) <= {"code", "message", "request_id", "param"}
    assert error["request_id"] == response.headers["x-request-id"]
    return error


def metric(client: httpx.Client, name: str, **labels: str) -> float:
    """The value of one sample of ``GET /metrics``, 0 when it is not there yet."""
    text = client.get("/metrics").text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def direct_pipeline(class_name: str, folder: Path | str) -> Any:
    """diffusers' ``class_name`` loaded from ``folder``, as a test's direct call of it runs: no progress
    bar, and weights in memory of their own, as the server keeps them (CPU kernels round differently on
    a tensor left where the memory-mapped file put it, and the last bit would show it)."""
    import diffusers

    from server.models.registry import own_memory

    pipeline: Any = getattr(diffusers, class_name).from_pretrained(folder, local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    own_memory(pipeline)
    return pipeline
