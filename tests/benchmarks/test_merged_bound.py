"""The merged-forward bound benchmark, on the tiny random-weight Flux: it measures what it says."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import merged_bound


def test_it_prints_the_bound_and_the_stages_outside_the_denoiser(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    threads = torch.get_num_threads()
    try:
        result = merged_bound.main(
            [
                "--model",
                "tiny-flux",
                "--requests",
                "2",
                "--rows",
                "2",
                "--repeats",
                "2",
                "--cache-dir",
                str(tmp_path),
            ]
        )
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert 0 < result["share"] < 1 and result["speedup"] > 0
    assert result["bound"] == pytest.approx(1 / ((1 - result["share"]) + result["share"] / result["speedup"]))
    # Both stages were captured from a generation and timed.
    assert {"text_saved", "decode_saved"} <= set(result)
    assert "text encoding:" in printed and "decoding:" in printed
