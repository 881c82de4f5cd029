"""Prompt sets for measuring a cache policy on the shapes model: scenes said in several phrasings.

The training captions follow one template (``Scene.caption``); users type otherwise. Each phrasing
here says the same scene in the model's words (``dataset.WORDS``), within the T5 length it was
trained with, so that a set drawn with one seed and phrasing is unlike one drawn with another in
both what it shows and how it says it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from shapes import dataset

_SYNONYM_SIZES = {"small": "tiny", "large": "big"}
_SYNONYM_POSITIONS = {
    "center": "in the middle",
    "left": "at the left",
    "right": "at the right",
    "top": "at the top",
    "bottom": "at the bottom",
}


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: dataset.Scene) -> str:
    """The training template: "a small red circle at the left on a blue background"."""
    return scene.caption


def terse(scene: dataset.Scene) -> str:
    """Keywords only: "small red circle left blue background"."""
    words = [scene.size, scene.fg, scene.shape, scene.position, scene.bg, "background"]
    return " ".join(words)


def sentence(scene: dataset.Scene) -> str:
    """Synonyms in a longer frame: "an image of a big red circle in the middle with a blue background"."""
    size = _SYNONYM_SIZES[scene.size]
    return (
        f"an image of {_article(size)} {size} {scene.fg} {scene.shape} "
        f"{_SYNONYM_POSITIONS[scene.position]} with {_article(scene.bg)} {scene.bg} background"
    )


def background_first(scene: dataset.Scene) -> str:
    """The background first: "on a blue background a large red circle at the left"."""
    return (
        f"on {_article(scene.bg)} {scene.bg} background a {scene.size} {scene.fg} {scene.shape} "
        f"{dataset.POSITIONS[scene.position][0]}"
    )


PHRASINGS: dict[str, Callable[[dataset.Scene], str]] = {
    "caption": caption,
    "terse": terse,
    "sentence": sentence,
    "background_first": background_first,
}


@dataclass(frozen=True)
class PromptSet:
    """``count`` scenes drawn from ``seed``, said in ``phrasings`` in turn; a benchmark runs prompt i
    on noise seed ``seed + i``."""

    name: str
    seed: int
    count: int
    phrasings: tuple[str, ...]

    def prompts(self) -> list[str]:
        scenes = dataset.scenes(self.count, self.seed)
        return [PHRASINGS[self.phrasings[i % len(self.phrasings)]](scene) for i, scene in enumerate(scenes)]

    def seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.count)]


# What the shipped calibration measures: every phrasing, a seed of its own.
CALIBRATION = PromptSet("calibration", 4_242, 192, tuple(PHRASINGS))
# What the quality benchmark checks targets on: none of them shares a seed with the calibration, and
# each leans on other phrasings.
HELD_OUT: tuple[PromptSet, ...] = (
    PromptSet("A: captions", 1_001, 16, ("caption",)),
    PromptSet("B: terse and background first", 2_002, 16, ("terse", "background_first")),
    PromptSet("C: sentences and captions", 3_003, 16, ("sentence", "caption")),
)
