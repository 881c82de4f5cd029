"""Trajectory reuse on a stream of similar prompts, end to end: ``python -m benchmarks.trajectories``.

Starts ``python -m server serve`` on ``shapes-flux`` (loopback) and replays a stream of 48 prompts, one
at a time, at the served defaults, each with a seed of its own: 12 new scenes, and after each its
follow-ups, interleaved at random: the same text again, the scene said in another phrasing, and the scene
with one attribute changed (foreground, background, position or shape, in turn). Each prompt runs
uncached from noise and then with ``"reuse": {"similar": {}}`` under the model's calibrated rule, back to
back on one server (its prompt cache off, so that neither encodes for the other). Per prompt it records the client wall time, the steps skipped and the earlier request,
the PSNR against the prompt's own uncached output (its seed), the PSNR against its uncached output from
the noise it resumed (the earlier request's seed), and what the shape detector reads from both outputs.

Writes ``docs/trajectories.md``, ``.png`` (the calibration pairs' PSNR against the steps skipped, with
the rule; the stream's prompts) and ``.json``. ``--results docs/trajectories.json`` renders them again
without running.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import math
import os
import statistics
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

from benchmarks.edits import psnr
from benchmarks.load import start_server, stop_server
from benchmarks.naming import db_text, json_safe
from server.models.calibration import load_calibration, psnr_from_json
from shapes import dataset, detector
from shapes.prompts import PHRASINGS

MODEL = "shapes-flux"
ASSETS = Path(__file__).resolve().parents[1] / "server" / "assets" / MODEL
STREAM_SEED = 6_006
ORIGINALS = 12
KINDS = ("new", "same text", "rephrased", "one attribute")
# What a changed attribute may not be read differently from the uncached output as.
GUARDED = ("fg", "bg", "position")
ATTRIBUTES = ("fg", "bg", "position", "size", "shape")


@dataclass(frozen=True)
class Item:
    kind: str
    prompt: str
    seed: int
    # The stream index of the new scene it follows (itself for a new one).
    origin: int


@dataclass
class Served:
    item: Item
    uncached_ms: float
    reuse_ms: float
    steps: int
    steps_skipped: int = 0
    source: int | None = None
    similarity: float | None = None
    psnr_own: float = math.inf
    psnr_same_noise: float | None = None
    wanted: dict[str, str] = field(default_factory=dict)
    read_uncached: dict[str, str | None] = field(default_factory=dict)
    read_reuse: dict[str, str | None] = field(default_factory=dict)


def _changed(rng: np.random.Generator, scene: dataset.Scene, which: str) -> dataset.Scene:
    attributes = {
        "shape": scene.shape,
        "fg": scene.fg,
        "bg": scene.bg,
        "size": scene.size,
        "position": scene.position,
    }
    if which in ("fg", "bg"):
        taken = {scene.fg, scene.bg}
        attributes[which] = str(rng.choice([c for c in dataset.COLOUR_NAMES if c not in taken]))
    elif which == "position":
        attributes["position"] = str(rng.choice([p for p in dataset.POSITIONS if p != scene.position]))
    else:
        attributes["shape"] = str(rng.choice([s for s in dataset.SHAPES if s != scene.shape]))
    # Said as the original was, but a changed position must be said to be asked for.
    return replace(
        dataset.jittered_scene(rng, **attributes),
        say_size=scene.say_size,
        say_position=scene.say_position or which == "position",
    )


def stream(seed: int = STREAM_SEED, originals: int = ORIGINALS) -> list[Item]:
    """The stream (see the module): each follow-up after the new scene it follows."""
    rng = np.random.default_rng(seed)
    phrasings = list(PHRASINGS)
    scenes = dataset.scenes(originals, seed)
    changes = ("fg", "bg", "position", "shape")
    pending: list[list[tuple[str, str]]] = []
    firsts: list[str] = []
    for index, scene in enumerate(scenes):
        said = phrasings[index % len(phrasings)]
        other = phrasings[(index + 1 + int(rng.integers(len(phrasings) - 1))) % len(phrasings)]
        first = PHRASINGS[said](scene)
        firsts.append(first)
        pending.append(
            [
                ("same text", first),
                ("rephrased", PHRASINGS[other](scene)),
                ("one attribute", PHRASINGS[said](_changed(rng, scene, changes[index % len(changes)]))),
            ]
        )
    items: list[Item] = []
    started: list[int] = []
    next_new = 0
    while next_new < originals or any(pending[k] for k in range(next_new)):
        ready = [k for k in range(next_new) if pending[k]]
        if next_new < originals and (not ready or rng.random() < 0.3):
            items.append(Item("new", firsts[next_new], 0, len(items)))
            started.append(len(items) - 1)
            next_new += 1
            continue
        k = int(rng.choice(ready))
        kind, prompt = pending[k].pop(int(rng.integers(len(pending[k]))))
        items.append(Item(kind, prompt, 0, started[k]))
    return [Item(item.kind, item.prompt, seed + index, item.origin) for index, item in enumerate(items)]


def _pixels(answer: dict[str, Any]) -> np.ndarray:
    data = base64.b64decode(answer["data"][0]["b64_json"])
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _post(client: httpx.Client, body: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    started = time.perf_counter()
    response = client.post("/v1/generations", json=body)
    wall = (time.perf_counter() - started) * 1000
    response.raise_for_status()
    answer: dict[str, Any] = response.json()
    return wall, answer


def _read(pixels: np.ndarray, wanted: dict[str, str]) -> dict[str, str | None]:
    found = detector.detect(pixels)
    return {name: found.get(name) for name in wanted}


def replay(items: Sequence[Item], torch_threads: int) -> list[Served]:
    """Each prompt uncached and then with reuse, back to back on one server, so that both times are taken
    under the same load; the uncached requests keep no trajectory, and the prompt cache is off so that
    neither encodes for the other."""
    bodies = [{"model": MODEL, "prompt": item.prompt, "seed": item.seed} for item in items]
    served: list[Served] = []
    with tempfile.TemporaryDirectory() as cache, _environment(DITCACHE_TEXT_CACHE_MB="0"):
        process, base_url = start_server(Path(cache), 4, torch_threads, models=[MODEL])
        try:
            with httpx.Client(base_url=base_url, timeout=300) as client:
                ids: dict[str, int] = {}
                for index, (item, body) in enumerate(zip(items, bodies, strict=True)):
                    plain_ms, plain = _post(client, body)
                    reuse_ms, answer = _post(client, {**body, "reuse": {"similar": {}}})
                    ids[answer["request_id"]] = index
                    wanted = detector.parse_prompt(item.prompt)
                    own, out = _pixels(plain), _pixels(answer)
                    row = Served(
                        item,
                        plain_ms,
                        reuse_ms,
                        steps=answer["steps"],
                        psnr_own=psnr(out, own),
                        wanted=wanted,
                        read_uncached=_read(own, wanted),
                        read_reuse=_read(out, wanted),
                    )
                    trajectory = answer["reused_trajectory"]
                    if trajectory is not None:
                        row.steps_skipped = trajectory["steps_skipped"]
                        row.similarity = trajectory["similarity"]
                        row.source = ids[trajectory["request_id"]]
                        # What this prompt makes from the noise it resumed: the earlier request's seed.
                        _, same_noise = _post(client, {**body, "seed": items[row.source].seed})
                        row.psnr_same_noise = psnr(out, _pixels(same_noise))
                    served.append(row)
        finally:
            stop_server(process)
    return served


@contextmanager
def _environment(**values: str) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# -- the report -------------------------------------------------------------------------------------------


def _adherence(rows: Sequence[Served], attribute: str, which: str) -> float | None:
    asked = [row for row in rows if attribute in row.wanted]
    if not asked:
        return None
    read = (lambda row: row.read_uncached) if which == "uncached" else (lambda row: row.read_reuse)
    return sum(read(row)[attribute] == row.wanted[attribute] for row in asked) / len(asked)


def _flips(rows: Sequence[Served]) -> list[tuple[int, str]]:
    """(stream index, attribute) where the uncached output read right and the reused one did not."""
    return [
        (index, name)
        for index, row in enumerate(rows)
        for name in GUARDED
        if name in row.wanted
        and row.read_uncached[name] == row.wanted[name]
        and row.read_reuse[name] != row.wanted[name]
    ]


def summary(rows: Sequence[Served]) -> dict[str, Any]:
    steps = sum(row.steps for row in rows)
    skipped = sum(row.steps_skipped for row in rows)
    adherence = {
        name: {"uncached": _adherence(rows, name, "uncached"), "reuse": _adherence(rows, name, "reuse")}
        for name in ATTRIBUTES
    }
    return {
        "prompts": len(rows),
        "steps": steps,
        "steps_skipped": skipped,
        "steps_saved": skipped / steps if steps else 0.0,
        "resumed": sum(row.steps_skipped > 0 for row in rows),
        "uncached_ms": sum(row.uncached_ms for row in rows),
        "reuse_ms": sum(row.reuse_ms for row in rows),
        "adherence": adherence,
        "flips": _flips(rows),
    }


def _by_kind(rows: Sequence[Served]) -> list[str]:
    lines = [
        "| prompts | count | resumed | steps saved | time (reuse / uncached) | PSNR vs own, median | "
        "PSNR vs same noise, median |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        chosen = [row for row in rows if row.item.kind == kind]
        if not chosen:
            continue
        stats = summary(chosen)
        resumed = [row for row in chosen if row.psnr_same_noise is not None]
        same_noise = (
            db_text(statistics.median(row.psnr_same_noise or 0.0 for row in resumed)) if resumed else "–"
        )
        lines.append(
            f"| {kind} | {len(chosen)} | {stats['resumed']} | {stats['steps_saved']:.0%} | "
            f"{stats['reuse_ms'] / stats['uncached_ms']:.2f} | "
            f"{db_text(statistics.median(row.psnr_own for row in chosen))} | {same_noise} |"
        )
    return lines


def _bound(pairs: dict[str, Any] | None, rule: dict[str, Any] | None) -> list[str]:
    """Why other prompts skip what they do: the calibration pairs at the fewest steps kept."""
    if pairs is None or rule is None or not pairs["pairs"]:
        return []
    first = min(int(k) for k in pairs["pairs"][0]["psnr"])
    values = sorted(psnr_from_json(pair["psnr"][str(first)]) for pair in pairs["pairs"])
    keeping = sum(value >= rule["floor_psnr"] for value in values) / len(values)
    return [
        f"What bounds it: resumed after {first} of {pairs['steps']} steps of another prompt, the "
        f"calibration's {len(values)} pairs keep a median {statistics.median(values):.1f} dB against their "
        f"own run from the same noise, and {keeping:.0%} of them keep {rule['floor_psnr']:g} dB; the rule "
        "lets a similarity skip only where all but 10% of the pairs at least that similar keep it. So the "
        "steps saved are about the stream's share of repeated text times the share a repeat skips.",
        "",
    ]


def report(rows: Sequence[Served], rule: dict[str, Any] | None, pairs: dict[str, Any] | None = None) -> str:
    total = summary(rows)
    lines = [
        "# Trajectory reuse on a stream of similar prompts",
        "",
        "`python -m benchmarks.trajectories` (see its docstring): `shapes-flux` at its served defaults "
        f"(20 steps, true CFG 3), {total['prompts']} prompts one at a time, each with its own seed, uncached "
        'and then with `"reuse": {"similar": {}}` back to back on one server (the prompt cache off).',
        "",
    ]
    if rule is not None:
        shown = ", ".join(f"{share:.0%} from similarity {lowest:g}" for lowest, share in rule["points"])
        lines += [
            f"The rule (`ditcache calibrate --trajectories`, {rule['pairs']} pairs, floor "
            f"{rule['floor_psnr']:g} dB against the prompt's own run from the same noise): the same prompt "
            f"skips {rule['same_prompt']:.0%} of the steps; other prompts {shown or 'none'}.",
            "",
        ]
    lines += [
        f"- **Denoising steps saved: {total['steps_saved']:.1%}** ({total['steps_skipped']} of "
        f"{total['steps']}); {total['resumed']} of {total['prompts']} requests started along an earlier "
        "trajectory.",
        f"- **End-to-end time**: {total['reuse_ms'] / 1000:.1f} s against {total['uncached_ms'] / 1000:.1f} s "
        f"uncached ({total['reuse_ms'] / total['uncached_ms']:.2f}x).",
        "- **Detector adherence** (share of prompts whose asked attribute is read), uncached → reuse: "
        + "; ".join(
            f"{name} {value['uncached']:.2f} → {value['reuse']:.2f}"
            for name, value in total["adherence"].items()
            if value["uncached"] is not None
        )
        + ".",
        f"- **Colour or position read wrong where the uncached output was right: {len(total['flips'])}**"
        + (
            " (" + ", ".join(f"prompt {index} {name}" for index, name in total["flips"]) + ")."
            if total["flips"]
            else "."
        ),
        "",
        *_bound(pairs, rule),
        "By kind of prompt:",
        "",
        *_by_kind(rows),
        "",
        "PSNR against the prompt's own uncached output compares two different noises once a request "
        "resumes: a same-text repeat is the earlier request's image, exactly (its seed's), so it scores as "
        "far from its own seed's image as any other seed would. Against the same noise it is identical. "
        "The adherence and the flips are what the request asked for.",
        "",
        "![Calibration pairs and the stream](trajectories.png)",
        "",
    ]
    return "\n".join(lines)


def plot(
    rows: Sequence[Served], pairs: dict[str, Any] | None, rule: dict[str, Any] | None, path: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    if pairs is not None:
        steps = pairs["steps"]
        bins = ((0.8, 1.01, "similarity ≥ 0.8"), (0.6, 0.8, "0.6–0.8"), (-1.0, 0.6, "< 0.6"))
        for lowest, highest, label in bins:
            chosen = [pair for pair in pairs["pairs"] if lowest <= pair["similarity"] < highest]
            if not chosen:
                continue
            shares = sorted(int(k) for k in chosen[0]["psnr"])
            values = [[min(psnr_from_json(pair["psnr"][str(k)]), 60.0) for pair in chosen] for k in shares]
            left.plot(
                [k / steps for k in shares],
                [statistics.median(v) for v in values],
                marker="o",
                label=f"{label} ({len(chosen)} pairs), median",
            )
            left.plot(
                [k / steps for k in shares],
                [min(v) for v in values],
                ls=":",
                color=left.lines[-1].get_color(),
            )
        if rule is not None:
            left.axhline(rule["floor_psnr"], color="red", lw=1, label=f"floor {rule['floor_psnr']:g} dB")
        left.set_xlabel("share of steps skipped (K / N)")
        left.set_ylabel("PSNR vs own run from the same noise (dB; dotted: worst)")
        left.set_title("calibration: a prompt resumed from another's trajectory")
        left.legend(fontsize=8)
    width = 0.38
    places = np.arange(len(KINDS))
    saved, timed = [], []
    for kind in KINDS:
        chosen = [row for row in rows if row.item.kind == kind]
        total = summary(chosen) if chosen else None
        saved.append(total["steps_saved"] if total else 0.0)
        timed.append(total["reuse_ms"] / total["uncached_ms"] if total else 0.0)
    right.bar(places - width / 2, saved, width, label="steps skipped (share)")
    right.bar(places + width / 2, timed, width, label="end-to-end time, reuse / uncached")
    right.set_xticks(places, KINDS)
    right.set_ylim(0, 1.15)
    right.set_title(f"the stream: {summary(rows)['steps_saved']:.0%} of all steps skipped")
    right.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def _row_from_json(row: dict[str, Any]) -> Served:
    """A recorded row; null PSNRs were infinite (identical), save where the request did not resume."""
    resumed = row["steps_skipped"] > 0
    return Served(
        **{
            **row,
            "item": Item(**row["item"]),
            "psnr_own": psnr_from_json(row["psnr_own"]),
            "psnr_same_noise": psnr_from_json(row["psnr_same_noise"]) if resumed else None,
        }
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument("--results", type=Path, default=None, help="render a recorded run again")
    parser.add_argument("--torch-threads", type=int, default=2)
    parser.add_argument("--originals", type=int, default=ORIGINALS, help="new scenes in the stream")
    args = parser.parse_args(argv)
    calibration = load_calibration(ASSETS / "calibration.json")
    rule = None if calibration.trajectory_rule is None else calibration.trajectory_rule.to_json()
    pairs_path = ASSETS / "calibration.trajectories.json"
    pairs = json.loads(pairs_path.read_text()) if pairs_path.exists() else None
    if args.results is not None:
        recorded = json.loads(args.results.read_text())
        rows = [_row_from_json(row) for row in recorded["rows"]]
    else:
        rows = replay(stream(originals=args.originals), args.torch_threads)
    args.out.mkdir(parents=True, exist_ok=True)
    text = report(rows, rule, pairs)
    (args.out / "trajectories.md").write_text(text)
    (args.out / "trajectories.json").write_text(
        json.dumps(json_safe({"rule": rule, "rows": [asdict(row) for row in rows]}), indent=1) + "\n"
    )
    plot(rows, pairs, rule, args.out / "trajectories.png")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
