"""Writing the pipeline swaps a complete folder in: a rerun replaces it, a failed write leaves it."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, cast

import pytest

from shapes.export import save_atomically

if TYPE_CHECKING:
    from diffusers.pipelines.flux.pipeline_flux import FluxPipeline


class FakePipeline:
    """Stands in for a FluxPipeline: only ``save_pretrained`` is called."""

    def __init__(self, marker: str, fail: bool = False) -> None:
        self.marker, self.fail = marker, fail

    def save_pretrained(self, folder: Path) -> None:
        (folder / "model_index.json").write_text(self.marker)
        if self.fail:
            raise OSError("disk full")


def save(pipe: FakePipeline, out: Path) -> None:
    save_atomically(cast("FluxPipeline", pipe), out)


def test_a_new_pipeline_replaces_the_old_and_a_failed_one_leaves_it(tmp_path: Path) -> None:
    out = tmp_path / "models" / "pipe"
    save(FakePipeline("first"), out)
    save(FakePipeline("second"), out)
    assert (out / "model_index.json").read_text() == "second"
    assert out.stat().st_mode & 0o777 == 0o755

    with pytest.raises(OSError, match="disk full"):
        save(FakePipeline("third", fail=True), out)
    assert (out / "model_index.json").read_text() == "second"
    # No staging or swapped-out folder is left beside it.
    assert [p.name for p in out.parent.iterdir()] == ["pipe"]
