"""The dataset is seeded, its captions say what is drawn, and the detector reads clean renders exactly."""

from __future__ import annotations

import numpy as np

from shapes import dataset, detector


def test_same_seed_same_pixels_and_captions() -> None:
    a, b = dataset.scenes(20, 7), dataset.scenes(20, 7)
    assert a == b
    assert np.array_equal(dataset.render_batch(a), dataset.render_batch(b))
    assert [s.caption for s in dataset.scenes(20, 8)] != [s.caption for s in a]


def test_captions_parse_back_to_the_scene() -> None:
    for scene in dataset.scenes(300, 1):
        assert detector.parse_prompt(scene.caption) == detector.scene_attributes(scene)
        assert scene.fg != scene.bg


def test_every_caption_word_is_in_the_word_list() -> None:
    words = {w for s in dataset.scenes(300, 2) for w in s.caption.split()}
    assert words <= set(dataset.WORDS)


def test_detector_reads_clean_renders() -> None:
    scenes = dataset.scenes(200, 3)
    for scene, image in zip(scenes, dataset.render_batch(scenes), strict=True):
        found = detector.detect(image)
        assert detector.score(detector.scene_attributes(scene, all_attributes=True), found) == dict.fromkeys(
            detector.ATTRIBUTES, True
        ), scene


def test_detector_finds_no_object_on_a_flat_image() -> None:
    flat = np.full((64, 64, 3), dataset.COLOURS["blue"], dtype=np.uint8)
    found = detector.detect(flat)
    assert found.bg == "blue"
    assert found.fg is None and found.shape is None


def test_parse_prompt_reads_free_text() -> None:
    assert detector.parse_prompt("A big Red star in the middle, on a white background") == {
        "fg": "red",
        "bg": "white",
        "shape": "star",
        "size": "large",
        "position": "center",
    }


def test_a_jittered_scene_keeps_its_attributes_and_stays_near_its_anchor() -> None:
    rng = np.random.default_rng(0)
    wanted = {"shape": "star", "fg": "red", "bg": "blue", "size": "large", "position": "left"}
    scenes = [dataset.jittered_scene(rng, **wanted) for _ in range(50)]
    (ax, ay), (low, high) = dataset.POSITIONS["left"][1], dataset.SIZES["large"]
    for scene in scenes:
        assert {name: getattr(scene, name) for name in wanted} == wanted
        assert abs(scene.cx - ax) <= dataset.POSITION_JITTER and abs(scene.cy - ay) <= dataset.POSITION_JITTER
        assert low <= scene.r <= high
    # The jitter is drawn, not fixed.
    assert len({(s.cx, s.cy, s.r, s.fg_rgb) for s in scenes}) == len(scenes)
