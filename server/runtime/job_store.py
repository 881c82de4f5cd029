"""Where jobs live: a store that every replica and ingress reaches, and that outlives the process.

A job is one ``JobRecord``. The process that runs it (its *owner*) writes its status, progress and
final result (the wire JSON of ``/v1/generations``); any process reads it, asks for a cancel (a flag
the owner reads at every denoising step) or cancels it outright while it is still queued. Owners beat
a heartbeat; the unfinished jobs of an owner whose heartbeat has stopped are *orphans*, which a live
process claims and runs again (``server.runtime.jobs``).

Two backends behind one interface, chosen by URL (``open_store``):

- ``sqlite:PATH``: an embedded file, the default (``<cache_dir>/jobs.sqlite``): one host, any number
  of processes (WAL mode).
- ``redis://HOST:PORT/DB``: a Redis server, shared by hosts (``pip install 'ditcache[ray]'`` brings
  the client).

Every write that depends on what is stored (an owner's update, a claim, a cancel) is atomic: a
transaction in SQLite, an optimistic ``WATCH`` transaction in Redis. Calls are blocking and short;
they are made from the event loop and from worker threads alike, so each backend is thread-safe.
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

# A job's status as the store keeps it; the wire's JobView.status has the same values (a test holds them).
JobStatus = Literal["queued", "running", "succeeded", "failed", "cancelled"]
FINAL: frozenset[JobStatus] = frozenset({"succeeded", "failed", "cancelled"})
UNFINISHED: frozenset[JobStatus] = frozenset({"queued", "running"})


@dataclass
class JobRecord:
    id: str
    status: JobStatus
    model: str
    request_id: str
    seed: int
    created: float
    total_steps: int
    # The request body with its seed and model filled in: enough to run it again, to the same bytes.
    body: str
    # The X-Request-Timeout it was given, counted from ``created``; None: no deadline.
    timeout_s: float | None = None
    started: float | None = None
    finished: float | None = None
    step: int = 0
    # As last written by the owner; the owner itself answers with the live position.
    queue_position: int | None = None
    # The answer and the error, as the wire writes them (``server.runtime.views``).
    result: str | None = None
    error: str | None = None
    # Who runs it; "" when nobody does (released, to be claimed).
    owner: str = ""
    # How many times a process took it to run; a job that keeps taking its servers down stops here.
    attempts: int = 1
    # Read-only on a record: set through ``request_cancel`` and ``cancel_queued``.
    cancel_requested: bool = False
    # The tenant whose key created it: only that tenant sees it ("" without keys, or for ``api_key``).
    tenant: str = ""

    def data(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_data(cls, data: dict[str, Any]) -> JobRecord:
        return cls(**data)


class JobStore(ABC):
    """The operations ``server.runtime.jobs`` needs; every method is atomic and thread-safe."""

    url: str

    @abstractmethod
    def create(self, record: JobRecord) -> None: ...

    @abstractmethod
    def get(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def delete(self, job_id: str) -> None: ...

    @abstractmethod
    def update(self, job_id: str, owner: str, **changes: Any) -> bool:
        """Apply ``changes`` if ``owner`` still owns the job and it has not ended; False otherwise.

        ``changes`` may hand the job to another owner (``owner=""`` releases it).
        """

    @abstractmethod
    def request_cancel(self, job_id: str) -> JobRecord | None:
        """Raise the cancel flag of an unfinished job; the record as it is now (None: no such job)."""

    @abstractmethod
    def cancel_queued(self, job_id: str, error: str, now: float) -> bool:
        """End a job that is still queued as cancelled (with ``error``); False if it is not queued."""

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    def cancelled(self, owner: str) -> list[str]:
        """Unfinished jobs of ``owner`` whose cancel flag is up."""

    @abstractmethod
    def heartbeat(self, owner: str, now: float) -> None: ...

    @abstractmethod
    def forget(self, owner: str) -> None:
        """``owner`` stops cleanly: its heartbeat goes (its unfinished jobs, if any, become orphans)."""

    @abstractmethod
    def orphans(self, stale_before: float) -> list[str]:
        """Unfinished jobs with no owner, or whose owner's last heartbeat is older than ``stale_before``."""

    @abstractmethod
    def claim(self, job_id: str, owner: str, stale_before: float) -> JobRecord | None:
        """Make ``owner`` the owner of an orphan, atomically; None if it is no longer one."""

    @abstractmethod
    def evict(self, now: float, ttl_s: float, max_finished: int) -> int:
        """Drop finished jobs older than ``ttl_s`` and the oldest beyond ``max_finished``; how many."""

    @abstractmethod
    def close(self) -> None: ...


def open_store(url: str | None, cache_dir: Path) -> JobStore:
    """The store named by ``url``: ``sqlite:PATH``, ``redis://...`` or None for the default file."""
    if url is None:
        return SqliteJobStore(cache_dir / "jobs.sqlite")
    if url.startswith("sqlite:"):
        return SqliteJobStore(Path(url.removeprefix("sqlite:")))
    if url.startswith(("redis://", "rediss://", "unix://")):
        return RedisJobStore(url)
    raise ValueError(f"job store must be sqlite:PATH or redis://..., got {url!r}")


def _apply(record: JobRecord, changes: dict[str, Any]) -> JobRecord:
    fixed = set(changes) - {field.name for field in dataclasses.fields(JobRecord)} | (
        {"id", "cancel_requested"} & set(changes)
    )
    if fixed:
        raise ValueError(f"cannot change {', '.join(sorted(fixed))}")
    return dataclasses.replace(record, **changes)


# -- SQLite ---------------------------------------------------------------------------------------------


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    owner TEXT NOT NULL,
    finished REAL,
    cancel INTEGER NOT NULL DEFAULT 0,
    data TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
CREATE INDEX IF NOT EXISTS jobs_finished ON jobs (finished);
CREATE TABLE IF NOT EXISTS owners (id TEXT PRIMARY KEY, seen REAL NOT NULL);
"""


class SqliteJobStore(JobStore):
    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.url = f"sqlite:{path}"
        self.path = path
        # One connection guarded by a lock: the event loop and the worker threads share it. Other
        # processes on the host open their own; WAL lets their readers run beside one writer.
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives the process dying; only an OS crash may lose the last ones.
        self._db.execute("PRAGMA synchronous=NORMAL")
        with self._lock:
            self._db.executescript(_SCHEMA)

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            # IMMEDIATE: take the write lock now, so that a read-then-write is never overtaken.
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _read(self, db: sqlite3.Connection, job_id: str) -> JobRecord | None:
        row = db.execute("SELECT data, cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            return None
        record = JobRecord.from_data(json.loads(row[0]))
        record.cancel_requested = bool(row[1])
        return record

    def _write(self, db: sqlite3.Connection, record: JobRecord) -> None:
        data = record.data()
        del data["cancel_requested"]
        db.execute(
            "INSERT INTO jobs (id, status, owner, finished, data) VALUES (?, ?, ?, ?, ?) "
            "ON CONFLICT (id) DO UPDATE SET status = excluded.status, owner = excluded.owner, "
            "finished = excluded.finished, data = excluded.data",
            (record.id, record.status, record.owner, record.finished, json.dumps(data)),
        )

    def create(self, record: JobRecord) -> None:
        with self._transaction() as db:
            self._write(db, record)

    def get(self, job_id: str) -> JobRecord | None:
        with self._lock:
            return self._read(self._db, job_id)

    def delete(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))

    def update(self, job_id: str, owner: str, **changes: Any) -> bool:
        with self._transaction() as db:
            record = self._read(db, job_id)
            if record is None or record.owner != owner or record.status in FINAL:
                return False
            self._write(db, _apply(record, changes))
            return True

    def request_cancel(self, job_id: str) -> JobRecord | None:
        with self._transaction() as db:
            record = self._read(db, job_id)
            if record is not None and record.status not in FINAL:
                db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
                record.cancel_requested = True
            return record

    def cancel_queued(self, job_id: str, error: str, now: float) -> bool:
        with self._transaction() as db:
            record = self._read(db, job_id)
            if record is None or record.status != "queued":
                return False
            self._write(db, _apply(record, {"status": "cancelled", "error": error, "finished": now}))
            db.execute("UPDATE jobs SET cancel = 1 WHERE id = ?", (job_id,))
            return True

    def cancel_requested(self, job_id: str) -> bool:
        with self._lock:
            row = self._db.execute("SELECT cancel FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return bool(row and row[0])

    def cancelled(self, owner: str) -> list[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id FROM jobs WHERE owner = ? AND cancel = 1 AND status IN ('queued', 'running')",
                (owner,),
            ).fetchall()
        return [row[0] for row in rows]

    def heartbeat(self, owner: str, now: float) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT INTO owners (id, seen) VALUES (?, ?) ON CONFLICT (id) DO UPDATE SET seen = excluded.seen",
                (owner, now),
            )

    def forget(self, owner: str) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM owners WHERE id = ?", (owner,))

    _ORPHANS = (
        "SELECT jobs.id FROM jobs LEFT JOIN owners ON owners.id = jobs.owner "
        "WHERE jobs.status IN ('queued', 'running') AND (owners.seen IS NULL OR owners.seen < ?)"
    )

    def orphans(self, stale_before: float) -> list[str]:
        with self._lock:
            rows = self._db.execute(self._ORPHANS + " ORDER BY jobs.rowid", (stale_before,)).fetchall()
        return [row[0] for row in rows]

    def claim(self, job_id: str, owner: str, stale_before: float) -> JobRecord | None:
        with self._transaction() as db:
            if db.execute(self._ORPHANS + " AND jobs.id = ?", (stale_before, job_id)).fetchone() is None:
                return None
            record = self._read(db, job_id)
            assert record is not None
            record.owner = owner
            self._write(db, record)
            return record

    def evict(self, now: float, ttl_s: float, max_finished: int) -> int:
        with self._transaction() as db:
            expired = db.execute(
                "DELETE FROM jobs WHERE finished IS NOT NULL AND finished < ?", (now - ttl_s,)
            )
            excess = db.execute(
                "DELETE FROM jobs WHERE id IN (SELECT id FROM jobs WHERE finished IS NOT NULL "
                "ORDER BY finished DESC LIMIT -1 OFFSET ?)",
                (max_finished,),
            )
            return int(expired.rowcount) + int(excess.rowcount)

    def close(self) -> None:
        with self._lock:
            self._db.close()


# -- Redis ----------------------------------------------------------------------------------------------


class RedisJobStore(JobStore):
    """Keys, under ``prefix``: ``job:ID`` (a hash: ``data``, ``status``, ``owner``, ``cancel``),
    ``unfinished`` (a set of ids), ``finished`` (a sorted set, by end time), ``owners`` (a sorted
    set, by last heartbeat)."""

    def __init__(self, url: str, prefix: str = "ditcache:") -> None:
        try:
            import redis
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ValueError(
                "a redis:// job store needs the redis package: pip install 'ditcache[ray]'"
            ) from exc
        self.url = url
        self._redis = redis.Redis.from_url(url, decode_responses=True)
        self._watch_error = redis.WatchError
        self._prefix = prefix
        self._unfinished = prefix + "unfinished"
        self._finished = prefix + "finished"
        self._owners = prefix + "owners"
        # Fail at start-up, not at the first job, when the server is not there.
        self._redis.ping()

    def _key(self, job_id: str) -> str:
        return f"{self._prefix}job:{job_id}"

    def _record(self, fields: dict[str, str]) -> JobRecord | None:
        if not fields:
            return None
        record = JobRecord.from_data(json.loads(fields["data"]))
        record.cancel_requested = fields.get("cancel") == "1"
        return record

    def _fields(self, record: JobRecord) -> dict[str, str]:
        data = record.data()
        del data["cancel_requested"]
        return {"data": json.dumps(data), "status": record.status, "owner": record.owner}

    def _store(self, pipe: Any, record: JobRecord) -> None:
        pipe.hset(self._key(record.id), mapping=self._fields(record))
        if record.status in FINAL:
            pipe.srem(self._unfinished, record.id)
            pipe.zadd(self._finished, {record.id: record.finished or time.time()})
        else:
            pipe.sadd(self._unfinished, record.id)

    def _atomically(self, job_id: str, change: Any) -> Any:
        """Run ``change(pipe, record)`` under WATCH of the job's key, again until no one raced it."""
        key = self._key(job_id)
        while True:
            with self._redis.pipeline() as pipe:
                try:
                    pipe.watch(key)
                    record = self._record(cast(dict[str, str], pipe.hgetall(key)))
                    pipe.multi()
                    outcome = change(pipe, record)
                    pipe.execute()
                    return outcome
                except self._watch_error:
                    continue

    def create(self, record: JobRecord) -> None:
        with self._redis.pipeline() as pipe:
            self._store(pipe, record)
            pipe.execute()

    def get(self, job_id: str) -> JobRecord | None:
        return self._record(cast(dict[str, str], self._redis.hgetall(self._key(job_id))))

    def delete(self, job_id: str) -> None:
        with self._redis.pipeline() as pipe:
            pipe.delete(self._key(job_id))
            pipe.srem(self._unfinished, job_id)
            pipe.zrem(self._finished, job_id)
            pipe.execute()

    def update(self, job_id: str, owner: str, **changes: Any) -> bool:
        def change(pipe: Any, record: JobRecord | None) -> bool:
            if record is None or record.owner != owner or record.status in FINAL:
                return False
            self._store(pipe, _apply(record, changes))
            return True

        return bool(self._atomically(job_id, change))

    def request_cancel(self, job_id: str) -> JobRecord | None:
        def change(pipe: Any, record: JobRecord | None) -> JobRecord | None:
            if record is not None and record.status not in FINAL:
                pipe.hset(self._key(job_id), "cancel", "1")
                record.cancel_requested = True
            return record

        return cast(JobRecord | None, self._atomically(job_id, change))

    def cancel_queued(self, job_id: str, error: str, now: float) -> bool:
        def change(pipe: Any, record: JobRecord | None) -> bool:
            if record is None or record.status != "queued":
                return False
            self._store(pipe, _apply(record, {"status": "cancelled", "error": error, "finished": now}))
            pipe.hset(self._key(job_id), "cancel", "1")
            return True

        return bool(self._atomically(job_id, change))

    def cancel_requested(self, job_id: str) -> bool:
        return self._redis.hget(self._key(job_id), "cancel") == "1"

    def cancelled(self, owner: str) -> list[str]:
        ids = sorted(cast(set[str], self._redis.smembers(self._unfinished)))
        with self._redis.pipeline(transaction=False) as pipe:
            for job_id in ids:
                pipe.hmget(self._key(job_id), "owner", "cancel")
            rows = pipe.execute()
        return [job_id for job_id, (who, flag) in zip(ids, rows, strict=True) if who == owner and flag == "1"]

    def heartbeat(self, owner: str, now: float) -> None:
        self._redis.zadd(self._owners, {owner: now})

    def forget(self, owner: str) -> None:
        self._redis.zrem(self._owners, owner)

    def _orphan(self, fields: dict[str, str] | None, stale_before: float) -> bool:
        if not fields or fields.get("status") not in UNFINISHED:
            return False
        owner = fields.get("owner", "")
        seen = self._redis.zscore(self._owners, owner) if owner else None
        return seen is None or float(seen) < stale_before

    def orphans(self, stale_before: float) -> list[str]:
        ids = sorted(cast(set[str], self._redis.smembers(self._unfinished)))
        out = []
        for job_id in ids:
            fields = cast(dict[str, str], self._redis.hgetall(self._key(job_id)))
            if not fields:
                self._redis.srem(self._unfinished, job_id)
            elif self._orphan(fields, stale_before):
                out.append(job_id)
        # Oldest first, as they were queued.
        records = [self.get(job_id) for job_id in out]
        return [record.id for record in sorted(filter(None, records), key=lambda record: record.created)]

    def claim(self, job_id: str, owner: str, stale_before: float) -> JobRecord | None:
        def change(pipe: Any, record: JobRecord | None) -> JobRecord | None:
            if record is None:
                return None
            fields = {"status": record.status, "owner": record.owner}
            if not self._orphan(fields, stale_before):
                return None
            record.owner = owner
            self._store(pipe, record)
            return record

        return cast(JobRecord | None, self._atomically(job_id, change))

    def evict(self, now: float, ttl_s: float, max_finished: int) -> int:
        expired = cast(list[str], self._redis.zrangebyscore(self._finished, "-inf", f"({now - ttl_s}"))
        excess = max(0, int(self._redis.zcard(self._finished)) - len(expired) - max_finished)
        oldest = cast(list[str], self._redis.zrange(self._finished, len(expired), len(expired) + excess - 1))
        gone = [*expired, *(oldest if excess else [])]
        if gone:
            with self._redis.pipeline() as pipe:
                pipe.delete(*(self._key(job_id) for job_id in gone))
                pipe.zrem(self._finished, *gone)
                pipe.execute()
        return len(gone)

    def close(self) -> None:
        self._redis.close()
