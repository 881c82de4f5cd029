"""``ditcache serve --backend ray``: the same FastAPI app, served by Ray Serve replicas.

The Ray Serve application has two deployments::

    HTTP ─► Ray's proxy ─► ingress ──(deployment handle: Ray picks the replica)──► ditcache × N
                           no model, no state                     create_app(settings), its lifespan,
                           passes each request on                 its models and workers; autoscaled
                                                                  on ongoing requests, num_gpus each

Each ``ditcache`` replica runs the whole app of ``create_app`` (routes, errors, headers, metrics)
with its own models (one copy per device), so the HTTP API is the one ``--backend local`` serves. Ray
chooses the replica for each request; their number is ``replicas``, or, when ``ray_min_replicas`` and
``ray_max_replicas`` are given instead, autoscaled between them on ``ray_target_ongoing_requests``. Jobs live in the shared job store (``job_store``: the default
SQLite file on one host, Redis across hosts), so a job is followed, fetched and cancelled through
any replica, and a job whose replica died is run again by another (``server.runtime.jobs``).

The ingress exists for one reason: a replica that dies mid-request. Ray's proxy would answer such a
request with a bare 500; the ingress sends it once more, to another replica (a generation is
deterministic given its body and seed, so the answer is the same bytes), and if that fails too, or
the answer had already begun, it ends the request with the 503 ``unavailable`` envelope. No request
waits forever on a replica that is gone.

``ray`` is imported only here and only when this backend is used: ``pip install 'ditcache[ray]'``.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from server.settings import Settings

logger = logging.getLogger(__name__)

APP_NAME = "ditcache"
REPLICA_DEPLOYMENT = "ditcache"
INGRESS_DEPLOYMENT = "ingress"
# The Ray replica (its actor's name) that answered, on every answer.
REPLICA_HEADER = b"x-replica"
# Ray counts an open event stream as an ongoing request like any other; the app's own queues (429)
# bound the work, so Ray's bound only has to be out of their way.
_MAX_ONGOING = 1000
_READY_POLL_S = 0.1
# ASGI scope keys a replica needs; the rest (the proxy's own objects) may not cross processes.
_SCOPE_KEYS = (
    "type", "asgi", "http_version", "method", "scheme", "path", "raw_path", "query_string", "headers",
    "client", "server",
)  # fmt: skip

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


class AppReplica:
    """One replica: ``create_app(settings)`` with its lifespan, driven over ASGI by ``handle``."""

    async def __init__(self, settings: Settings) -> None:  # type: ignore[misc]
        from server import logs
        from server.api.app import create_app

        logs.configure(settings.log_level, settings.log_format)
        self.app = create_app(settings)
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        runtime = self.app.state.runtime
        # Ray routes nothing here before the constructor returns: return once the models are resident.
        while runtime.state == "loading":
            await asyncio.sleep(_READY_POLL_S)
        if runtime.state != "ready":
            raise RuntimeError(f"the replica could not start: {runtime.not_ready_reason()}")
        # Apps still finishing for a client that left: kept, so that they are not collected mid-run.
        self._orphaned: set[asyncio.Task[None]] = set()
        from ray import serve

        # Named in every answer, so that an operator (and the tests) can tell which replica answered.
        self._replica = serve.get_replica_context().replica_id.to_full_id_str().encode()

    async def handle(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[Message]:
        """Run one HTTP request through the app; yields its ASGI messages as they are sent."""
        messages: asyncio.Queue[Message] = asyncio.Queue()
        gone = asyncio.Event()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            # The body was all there was; from now on the only news is that the client left.
            await gone.wait()
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            await messages.put(message)

        app = asyncio.create_task(self.app({**scope, "state": {}}, receive, send))
        try:
            while True:
                getter = asyncio.ensure_future(messages.get())
                await asyncio.wait({getter, app}, return_when=asyncio.FIRST_COMPLETED)
                if not getter.done():
                    getter.cancel()
                    while not messages.empty():
                        yield messages.get_nowait()
                    app.result()
                    return
                message = getter.result()
                if message["type"] == "http.response.start":
                    message["headers"] = [*message.get("headers", []), (REPLICA_HEADER, self._replica)]
                yield message
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    return
        finally:
            # The caller stopped listening (the client left): the app sees a disconnect, which
            # cancels its generation at the next step.
            gone.set()
            if not app.done():
                self._orphaned.add(app)
                app.add_done_callback(self._orphaned.discard)

    def check_health(self) -> None:
        """Ray replaces a replica whose models are gone or whose workers have stopped."""
        runtime = self.app.state.runtime
        if not runtime.ready:
            raise RuntimeError(runtime.not_ready_reason())

    async def __del__(self) -> None:
        # Ray's graceful shutdown: drain like SIGTERM does (running work may finish within the grace).
        runtime = self.app.state.runtime
        runtime.begin_drain()
        await self._lifespan.__aexit__(None, None, None)


class Forwarder:
    """The ingress's ASGI app: each HTTP request goes to a replica, once more if that one dies."""

    def __init__(self, max_body_bytes: int) -> None:
        self.max_body_bytes = max_body_bytes
        self._handle: Any = None

    def _replicas(self) -> Any:
        if self._handle is None:
            from ray import serve

            handle = serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=APP_NAME)
            self._handle = handle.options(stream=True)
        return self._handle

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await _lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        body = await _read_body(receive, self.max_body_bytes)
        forwarded = {key: scope[key] for key in _SCOPE_KEYS if key in scope}
        forwarded["root_path"] = ""
        from ray.exceptions import RayActorError

        # Ray's proxy echoes the request id itself (the client's, or one it made up and put in the
        # request, which the app then took): the app's copy would make the header appear twice.
        request_id = dict(scope.get("headers") or []).get(b"x-request-id")
        for attempt in (1, 2):
            started = False
            try:
                async for message in self._replicas().handle.remote(forwarded, body):
                    if message["type"] == "http.response.start" and request_id is not None:
                        message["headers"] = [
                            (key, value)
                            for key, value in message.get("headers", [])
                            if not (key.lower() == b"x-request-id" and value == request_id)
                        ]
                    started = True
                    await send(message)
                return
            except RayActorError as exc:
                if started:
                    # Part of the answer is out (an event stream): it cannot be taken back. The
                    # connection ends; a job it followed is run again by another replica.
                    logger.warning(
                        "replica died while answering %s: %s", scope.get("path"), type(exc).__name__
                    )
                    return
                logger.warning(
                    "replica died before answering %s (attempt %d): %s",
                    scope.get("path"),
                    attempt,
                    type(exc).__name__,
                )
        await _unavailable(scope, receive, send)


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def _read_body(receive: Receive, max_bytes: int) -> bytes:
    """The whole body, but never more than one byte past ``max_bytes``: enough for the replica's 413."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        chunks.append(chunk)
        size += len(chunk)
        if size > max_bytes or not message.get("more_body", False):
            break
    return b"".join(chunks)[: max_bytes + 1]


async def _unavailable(scope: Message, receive: Receive, send: Send) -> None:
    """The 503 envelope, with the request id, as the app itself answers one (see server.errors)."""
    from server.api.envelope import envelope
    from server.api.request_id import RequestIdMiddleware

    async def answer(scope: Message, receive: Receive, send: Send) -> None:
        response = envelope(
            503,
            "unavailable",
            "the replica serving this request stopped, and so did the one it was sent to next; retry later",
            scope["state"]["request_id"],
            headers={"Retry-After": "1"},
        )
        await response(scope, receive, send)

    await RequestIdMiddleware(answer)(dict(scope), receive, send)


# -- the application ----------------------------------------------------------------------------------


def build_application(settings: Settings) -> Any:
    """The Ray Serve application of ``settings``: the ingress bound to the app replicas."""
    from ray import serve

    fewest, most = settings.ray_replica_range
    # Each Ray replica is one copy of every model per device: ``replicas`` counted the Ray replicas.
    in_replica = settings.model_copy(update={"replicas": 1})
    replicas = serve.deployment(
        name=REPLICA_DEPLOYMENT,
        ray_actor_options={"num_gpus": settings.ray_num_gpus, "num_cpus": settings.ray_num_cpus},
        autoscaling_config={
            "min_replicas": fewest,
            "initial_replicas": fewest,
            "max_replicas": most,
            "target_ongoing_requests": settings.ray_target_ongoing_requests,
        },
        max_ongoing_requests=_MAX_ONGOING,
        # Loading a large model takes minutes; Ray waits, since the constructor returns when it is resident.
        health_check_period_s=10,
        health_check_timeout_s=30,
        graceful_shutdown_timeout_s=settings.shutdown_grace_s + 10,
    )(AppReplica)
    max_body_bytes = settings.max_body_bytes

    def forwarder() -> Forwarder:
        return Forwarder(max_body_bytes)

    ingress = serve.deployment(
        name=INGRESS_DEPLOYMENT,
        # It holds no model and does little: it must not take a CPU a replica could have.
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=_MAX_ONGOING,
    )(serve.ingress(forwarder)())
    return ingress.bind(replicas.bind(in_replica))


def app_builder(args: dict[str, Any]) -> Any:
    """The application for ``serve run`` and KubeRay (``import_path: server.ray_backend:app_builder``):
    settings from the ``args`` of the Serve config over ``DITCACHE_*`` variables over the defaults.

    The Serve config's own ``deployments`` entries (replica bounds, ``ray_actor_options``) override
    what the settings set here, as Ray Serve documents.
    """
    from server.settings import load_settings

    return build_application(load_settings(**{"backend": "ray", **args}))


def start(settings: Settings, *, blocking: bool = False) -> None:
    """Deploy ``settings``' application on the Ray cluster (``ray_address``, or a new local one)."""
    import ray
    from ray import serve

    if not ray.is_initialized():
        ray.init(address=settings.ray_address, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_application(settings), name=APP_NAME, route_prefix="/", blocking=False)
    if blocking:
        _wait_for_signal()
        serve.shutdown()
        ray.shutdown()


def _wait_for_signal() -> None:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    logger.info("serving on Ray Serve; SIGTERM or Ctrl-C stops it")
    stop.wait()
