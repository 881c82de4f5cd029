"""Replicas: resident copies of one model, each a pipeline with its own cache engines and worker.

A model served with ``--replicas N`` on each ``--device`` has one replica per copy. A request goes to
the replica of its model with the least queued work (waiting plus running); with equal work, to the
first, so that one replica alone behaves as the server always did.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from server.errors import NotReady
from server.models.registry import ResidentModel
from server.runtime.worker import Worker


@dataclass(frozen=True, eq=False)
class Replica:
    id: str
    device: str
    model: ResidentModel
    worker: Worker

    @property
    def queued_work(self) -> int:
        return self.worker.queue_depth + self.worker.busy


def least_loaded(replicas: Sequence[Replica]) -> Replica:
    """The live replica with the least queued work; raises NotReady when none is alive."""
    alive = [replica for replica in replicas if replica.worker.alive]
    if not alive:
        name = replicas[0].model.name if replicas else "this model"
        raise NotReady(f"no worker for {name!r} is running")
    return min(alive, key=lambda replica: replica.queued_work)
