"""The job store, each backend through the same tests: a SQLite file, and a real Redis server.

``redis_url`` starts ``redis-server`` (Debian's package; ``make test`` installs it when it is missing
and the user is root) on a free loopback port for the session; the other test modules that need a
shared store import it from here.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from server.runtime.job_store import JobRecord, JobStore, RedisJobStore, SqliteJobStore, open_store


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis server of this session's own, on loopback, holding nothing on disk."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip(
            "redis-server is not installed (make test installs it as root: apt-get install redis-server)"
        )
    pytest.importorskip("redis", reason="the redis client is not installed: pip install -e '.[ray]'")
    import redis

    port = _free_port()
    folder = tmp_path_factory.mktemp("redis")
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(folder),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                assert process.poll() is None, "redis-server exited at start"
                assert time.monotonic() < deadline, "redis-server did not answer"
                time.sleep(0.05)
        yield url
    finally:
        client.close()
        process.terminate()
        process.wait(30)


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[JobStore]:
    if request.param == "sqlite":
        opened: JobStore = SqliteJobStore(tmp_path / "jobs.sqlite")
    else:
        url = request.getfixturevalue("redis_url")
        # A prefix per test: the Redis server is shared by the session.
        opened = RedisJobStore(url, prefix=f"test:{request.node.name}:")
    yield opened
    opened.close()


def record(job_id: str, owner: str = "a", created: float = 0.0) -> JobRecord:
    return JobRecord(
        id=job_id,
        status="queued",
        model="tiny-flux",
        request_id=f"req-{job_id}",
        seed=1,
        created=created or time.time(),
        total_steps=4,
        body='{"prompt": "x"}',
        owner=owner,
    )


def test_records_round_trip_and_only_their_owner_changes_them(store: JobStore) -> None:
    store.create(record("j1"))
    assert store.get("j1") == record("j1", created=store.get("j1").created)  # type: ignore[union-attr]
    assert store.get("missing") is None
    assert not store.update("j1", "b", status="running")
    assert store.update("j1", "a", status="running", started=1.0, step=2)
    stored = store.get("j1")
    assert stored is not None and (stored.status, stored.started, stored.step) == ("running", 1.0, 2)
    with pytest.raises(ValueError, match="cancel_requested"):
        store.update("j1", "a", cancel_requested=True)
    assert store.update("j1", "a", status="succeeded", finished=time.time(), result='{"data": []}')
    # Ended: nobody writes it again, not even its owner.
    assert not store.update("j1", "a", status="running")
    stored = store.get("j1")
    assert stored is not None and stored.status == "succeeded" and stored.result == '{"data": []}'
    store.delete("j1")
    assert store.get("j1") is None


def test_cancel_flags_and_queued_cancels(store: JobStore) -> None:
    store.create(record("queued"))
    store.create(record("running"))
    store.update("running", "a", status="running")
    assert not store.cancel_requested("running")
    flagged = store.request_cancel("running")
    assert flagged is not None and flagged.cancel_requested and flagged.status == "running"
    assert store.cancel_requested("running")
    assert not store.cancel_queued("running", "{}", 1.0), "a running job stops at its step, not here"
    assert store.cancel_queued("queued", '{"code": "cancelled"}', 5.0)
    ended = store.get("queued")
    assert ended is not None and (ended.status, ended.finished, ended.error) == (
        "cancelled",
        5.0,
        '{"code": "cancelled"}',
    )
    assert store.cancelled("a") == ["running"]
    assert store.cancelled("b") == []
    assert store.request_cancel("missing") is None


def test_orphans_are_claimed_once(store: JobStore) -> None:
    now = time.time()
    # Both claimers are live processes, which beat a heartbeat before they claim (as ``Jobs.start``
    # does): a job claimed by an owner never seen would be an orphan again at once.
    store.heartbeat("alive", now)
    store.heartbeat("other", now)
    store.heartbeat("dead", now - 60)
    for job_id, owner in (("mine", "alive"), ("lost", "dead"), ("nobody", ""), ("ghost", "never-seen")):
        store.create(record(job_id, owner))
    store.create(record("done", "dead"))
    store.update("done", "dead", status="succeeded", finished=now)
    assert sorted(store.orphans(now - 10)) == ["ghost", "lost", "nobody"]
    # Two claimers race for each orphan: exactly one wins it.
    with ThreadPoolExecutor(2) as pool:
        claims = list(pool.map(lambda owner: store.claim("lost", owner, now - 10), ["alive", "other"]))
    winners = [claim for claim in claims if claim is not None]
    assert len(winners) == 1 and winners[0].owner in ("alive", "other")
    assert store.claim("mine", "other", now - 10) is None, "a live owner keeps its jobs"
    store.forget("alive")
    assert "mine" in store.orphans(now - 10)


def test_eviction_by_age_and_by_count(store: JobStore) -> None:
    now = time.time()
    for index in range(5):
        store.create(record(f"j{index}"))
        store.update(f"j{index}", "a", status="succeeded", finished=now - 100 + index)
    store.create(record("unfinished"))
    assert store.evict(now, ttl_s=97.5, max_finished=10) == 3  # j0, j1, j2 are older than 97.5 s
    assert store.evict(now, ttl_s=1000, max_finished=1) == 1  # j3 goes; j4 is the newest
    assert [store.get(f"j{index}") is not None for index in range(5)] == [False] * 4 + [True]
    assert store.get("unfinished") is not None


def test_sqlite_outlives_its_process(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "jobs.sqlite"
    first = open_store(f"sqlite:{path}", tmp_path)
    first.create(record("kept"))
    first.close()
    second = open_store(f"sqlite:{path}", tmp_path)
    assert second.get("kept") is not None
    second.close()
    default = open_store(None, tmp_path)
    assert isinstance(default, SqliteJobStore) and default.path == tmp_path / "jobs.sqlite"
    default.close()
    with pytest.raises(ValueError, match="sqlite:PATH or redis://"):
        open_store("postgres://x", tmp_path)
