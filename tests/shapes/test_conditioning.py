"""The conditioning report on the shipped checkpoint: the data's templates differ, the model's follow its words."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from PIL import Image

from server.models.builtin import SHAPES_FLUX_FOLDER
from shapes import conditioning, dataset, evaluate


@pytest.fixture(scope="module")
def report() -> conditioning.Report:
    return conditioning.measure(evaluate.load(SHAPES_FLUX_FOLDER))


def test_every_pair_of_shapes_is_measured(report: conditioning.Report) -> None:
    pairs = list(itertools.combinations(dataset.SHAPES, 2))
    for field in ("pooled_cosine", "template_distance", "data_distance", "pooled_share", "t5_share"):
        assert list(getattr(report, field)) == pairs
    assert all(-1.0 <= cosine <= 1.0 for cosine in report.pooled_cosine.values())


def test_the_datas_templates_tell_every_shape_apart(report: conditioning.Report) -> None:
    # Even circle and square, the closest pair, differ well beyond the jitter of 64 renders.
    assert min(report.data_distance.values()) > 0.15


def test_the_trained_model_draws_triangle_and_star_apart_from_circle(report: conditioning.Report) -> None:
    # A model that ignored the shape word would give the same template for every caption.
    for pair in [("circle", "triangle"), ("circle", "star"), ("square", "triangle")]:
        assert report.template_distance[pair] > 0.5 * report.data_distance[pair]
        # Each path's share is a projection; together they account for the change.
        assert 0.7 < report.pooled_share[pair] + report.t5_share[pair] < 1.3


def test_the_command_prints_the_table_and_writes_the_templates(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "templates.png"
    assert conditioning.main(["--model", str(SHAPES_FLUX_FOLDER), "--image", str(image)]) == 0
    out = capsys.readouterr().out
    assert "| circle / square |" in out and "pooled share" in out
    assert Image.open(image).size == (512, 128)
