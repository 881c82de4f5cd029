"""``python -m benchmarks.trajectories``: its stream is the mix it says, and a short run end to end resumes
the same text from the earlier request, to its bytes."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import pytest

from benchmarks import trajectories
from shapes import detector


def test_the_stream_mixes_new_scenes_with_their_follow_ups_each_after_its_scene() -> None:
    items = trajectories.stream()
    assert items == trajectories.stream()
    assert Counter(item.kind for item in items) == dict.fromkeys(trajectories.KINDS, trajectories.ORIGINALS)
    assert len({item.seed for item in items}) == len(items)
    for index, item in enumerate(items):
        origin = items[item.origin]
        assert origin.kind == "new" and item.origin <= index
        asked, first = detector.parse_prompt(item.prompt), detector.parse_prompt(origin.prompt)
        if item.kind == "same text":
            assert item.prompt == origin.prompt
        elif item.kind == "rephrased":
            assert item.prompt != origin.prompt
            assert all(asked[name] == first[name] for name in ("fg", "bg", "shape"))
        elif item.kind == "one attribute":
            changed = [
                name for name in ("fg", "bg", "shape", "position") if asked.get(name) != first.get(name)
            ]
            assert len(changed) == 1, (item.prompt, origin.prompt)


@pytest.mark.slow
def test_a_short_run_resumes_the_same_text_from_the_earlier_request(tmp_path: Path) -> None:
    items = trajectories.stream(originals=1)
    rows = trajectories.replay(items, torch_threads=2)
    same = next(row for row in rows if row.item.kind == "same text")
    assert same.steps_skipped > 0 and same.source == 0
    assert same.psnr_same_noise is not None and math.isinf(same.psnr_same_noise)
    assert rows[0].steps_skipped == 0 and math.isinf(rows[0].psnr_own)
    total = trajectories.summary(rows)
    assert total["steps_skipped"] == sum(row.steps_skipped for row in rows) > 0
    text = trajectories.report(rows, None)
    assert "Denoising steps saved" in text and "| same text | 1 |" in text
    trajectories.plot(rows, None, None, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 0
