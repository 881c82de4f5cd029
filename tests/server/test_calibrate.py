"""``ditcache calibrate`` on a tiny model, then ``target`` requests served from what it measured."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from server.models.calibration import load_calibration
from server.models.registry import calibration_path, load_model
from server.policy import calibrate
from tests.server.conftest import LiveServer, error_of, live_server

POLICIES = [
    {"method": "first_block_cache", "threshold": 0.3},
    {"method": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1, "use_lite_mode": True},
    # Runnable only with the ratios the calibration fits first.
    {"method": "mag_cache", "threshold": 0.5, "retention_ratio": 0.0},
    # What a target may choose: it predicts the last of the four steps, or none.
    {"method": "guarded_taylorseer", "step_tolerance": 0.0},
    {"method": "guarded_taylorseer", "step_tolerance": 10.0},
]


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    cache_dir = tmp_path_factory.mktemp("calibrated")
    model = load_model("tiny-flux", cache_dir=cache_dir)
    calibrate.calibrate(
        model,
        [calibrate.Setting(4, 1.0), calibrate.Setting(4, 3.0)],
        calibrate.calibration_prompts(2),
        calibration_path(cache_dir, model.name),
        time_limit_s=600,
        policies=POLICIES,
        log=lambda line: None,
    )
    return cache_dir


def test_the_calibration_has_a_curve_per_setting_with_every_policy(calibrated: Path) -> None:
    calibration = load_calibration(calibration_path(calibrated, "tiny-flux"))
    assert calibration.prompts == 2
    assert sorted((curve.steps, curve.guidance) for curve in calibration.curves) == [(4, False), (4, True)]
    for curve in calibration.curves:
        methods = sorted(point.policy["method"] for point in curve.points)
        assert methods == [
            "first_block_cache",
            "guarded_taylorseer",
            "guarded_taylorseer",
            "mag_cache",
            "none",
            "taylorseer",
        ]
        uncached = next(point for point in curve.points if point.policy["method"] == "none")
        assert uncached.psnr == float("inf") and uncached.speedup == 1.0
        assert all(point.worst_psnr <= point.tail <= point.psnr for point in curve.points)
        assert all(point.psnr_bound <= point.psnr for point in curve.points)


def test_the_bound_is_the_mean_error_plus_its_standard_error_at_95_percent() -> None:
    def psnr(mse: float) -> float:
        return 10 * math.log10(255.0**2 / mse)

    # Mean 2, sample standard deviation sqrt(2) over 2 prompts: a standard error of 1.
    assert calibrate.psnr_bound([1.0, 3.0]) == pytest.approx(psnr(2 + 1.645))
    # No spread, nothing to allow for; one prompt has no spread to measure.
    assert calibrate.psnr_bound([3.0, 3.0, 3.0]) == pytest.approx(psnr(3.0))
    assert calibrate.psnr_bound([3.0]) == pytest.approx(psnr(3.0))
    # Same mean, one prompt hurt badly: a heavy tail promises less.
    assert calibrate.psnr_bound([1.0, 1.0, 1.0, 9.0]) < calibrate.psnr_bound([3.0, 3.0, 3.0, 3.0])


def test_the_calibration_fits_magcache_ratios_and_teacache_coefficients(calibrated: Path) -> None:
    values = load_calibration(calibration_path(calibrated, "tiny-flux")).method_values
    # Fitted at the longest setting with guidance: one ratio per step, the first step's being 1.
    ratios = values["mag_cache"]["mag_ratios"]
    assert len(ratios) == 4 and ratios[0] == 1.0 and all(r > 0 for r in ratios)
    coefficients = values["teacache"]["coefficients"]
    assert len(coefficients) == 5 and all(isinstance(c, float) for c in coefficients)


def test_a_second_run_resumes_instead_of_measuring_again(calibrated: Path) -> None:
    out = calibration_path(calibrated, "tiny-flux")
    work = json.loads(out.with_suffix(".work.json").read_text())
    assert set(work) == {"prompts", "steps=4,guidance=1", "steps=4,guidance=3"}
    model = load_model("tiny-flux", cache_dir=calibrated)
    lines: list[str] = []
    advanced: list[None] = []
    calibrate.calibrate(
        model,
        [calibrate.Setting(4, 1.0)],
        calibrate.calibration_prompts(2),
        out,
        time_limit_s=600,
        policies=POLICIES,
        log=lines.append,
        advance=lambda: advanced.append(None),
    )
    assert not any(line.startswith("  prompt") for line in lines), lines
    # The progress bar still counts the prompts found done.
    assert len(advanced) == 2


def test_other_prompts_start_afresh_and_more_prompts_extend(calibrated: Path, tmp_path: Path) -> None:
    out = tmp_path / "other.json"
    model = load_model("tiny-flux", cache_dir=calibrated)
    logs = []
    for prompts in (["a red cube"], ["a blue cone"], ["a blue cone", "a green ball"]):
        lines: list[str] = []
        calibrate.calibrate(
            model,
            [calibrate.Setting(2, 1.0)],
            prompts,
            out,
            time_limit_s=600,
            policies=POLICIES[:1],
            log=lines.append,
        )
        logs.append(lines)
    assert any("starting afresh" in line for line in logs[1]), logs[1]
    # The third run keeps the first prompt's measurement and measures only the one added.
    assert not any("starting afresh" in line for line in logs[2])
    assert [line for line in logs[2] if line.startswith("  prompt")] == ["  prompt 2/2 (steps=2,guidance=1)"]
    assert json.loads(out.with_suffix(".work.json").read_text())["prompts"] == ["a blue cone", "a green ball"]


def test_a_policy_added_to_the_sweep_is_measured_on_the_prompts_already_done(
    calibrated: Path, tmp_path: Path
) -> None:
    out = tmp_path / "grown.json"
    model = load_model("tiny-flux", cache_dir=calibrated)
    runs = []
    for policies in (POLICIES[:1], POLICIES[:2]):
        lines: list[str] = []
        calibration = calibrate.calibrate(
            model,
            [calibrate.Setting(2, 1.0)],
            ["a red cube"],
            out,
            time_limit_s=600,
            policies=policies,
            log=lines.append,
        )
        runs.append(lines)
    assert any(line.startswith("  prompt") for line in runs[1]), runs[1]
    curve = next(curve for curve in calibration.curves if curve.steps == 2)
    assert sorted(point.policy["method"] for point in curve.points) == [
        "first_block_cache",
        "none",
        "taylorseer",
    ]
    work = json.loads(out.with_suffix(".work.json").read_text())["steps=2,guidance=1"]["0"]
    # The uncached time recorded first stays the reference of both policies.
    assert len(work) == 3 and all(seconds > 0 for _, _, seconds, *_ in work.values())


def test_prompts_come_from_a_file_one_per_line(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cube\n\n  a blue cone  \n")
    args = calibrate.parser().parse_args(["--model", "m", "--prompts-file", str(prompts)])
    assert calibrate.prompts_of(args) == ["a red cube", "a blue cone"]
    args = calibrate.parser().parse_args(["--model", "m", "--prompts", "3"])
    assert calibrate.prompts_of(args) == calibrate.calibration_prompts(3)


@pytest.fixture(scope="module")
def server(calibrated: Path) -> Iterator[LiveServer]:
    yield from live_server(calibrated)


@pytest.mark.parametrize("floor", [0.0, 20.0, 100.0])
def test_a_target_runs_the_fastest_measured_policy_over_its_floor(server: LiveServer, floor: float) -> None:
    calibration = load_calibration(calibration_path(server.runtime.settings.cache_dir, "tiny-flux"))
    curve = next(curve for curve in calibration.curves if not curve.guidance)
    expected = curve.fastest(floor)
    assert expected is not None
    with server.client() as client:
        body = {"model": "tiny-flux", "prompt": "a cat", "steps": 4, "guidance_scale": 1.0, "seed": 1}
        answer = client.post("/v1/generations", json={**body, "cache": {"target": {"min_psnr": floor}}})
    assert answer.status_code == 200, answer.text
    policy = answer.json()["cache_policy"]
    assert policy["method"] == expected.policy["method"]
    assert answer.json()["cache"]["method"] == expected.policy["method"]
    target = policy["target"]
    assert target["min_psnr"] == floor and target["outside_calibration"] is False
    assert target["psnr_lower_bound"] is None or target["psnr_lower_bound"] >= floor
    assert target["calibrated"] == {"steps": 4, "guidance_scale": 1.0, "prompts": 2}


def test_a_setting_outside_the_calibration_says_so(server: LiveServer) -> None:
    with server.client() as client:
        body = {"model": "tiny-flux", "prompt": "a cat", "steps": 8, "guidance_scale": 3.0, "seed": 1}
        answer = client.post("/v1/generations", json={**body, "cache": {"target": {"min_psnr": 20}}})
    assert answer.status_code == 200, answer.text
    target = answer.json()["cache_policy"]["target"]
    assert target["outside_calibration"] is True
    assert target["calibrated"]["steps"] == 4 and target["calibrated"]["guidance_scale"] == 3.0


def test_a_model_without_calibration_refuses_a_target(server: LiveServer) -> None:
    with server.client() as client:
        answer = client.post(
            "/v1/generations",
            json={"model": "tiny-wan", "prompt": "waves", "steps": 2, "cache": {"target": {"min_psnr": 30}}},
        )
    assert answer.status_code == 422
    assert error_of(answer)["param"] == "cache.target"


def test_a_bad_floor_names_the_field(server: LiveServer) -> None:
    with server.client() as client:
        answer = client.post(
            "/v1/generations",
            json={"model": "tiny-flux", "prompt": "x", "cache": {"target": {"min_psnr": -1}}},
        )
    assert answer.status_code == 422
    assert error_of(answer)["param"] == "cache.target.min_psnr"


def test_the_fitted_ratios_serve_a_magcache_request_that_gives_none(server: LiveServer) -> None:
    body = {"model": "tiny-flux", "prompt": "a cat", "steps": 4, "guidance_scale": 1.0, "seed": 1}
    with server.client() as client:
        answer = client.post(
            "/v1/generations", json={**body, "cache": {"method": "mag_cache", "threshold": 0.5}}
        )
        uncalibrated = client.post(
            "/v1/generations",
            json={"model": "tiny-wan", "prompt": "waves", "steps": 2, "cache": {"method": "mag_cache"}},
        )
    assert answer.status_code == 200, answer.text
    assert answer.json()["cache"]["method"] == "mag_cache"
    assert uncalibrated.status_code == 422
    assert error_of(uncalibrated)["param"] == "cache.mag_ratios"


def test_every_swept_policy_is_a_valid_cache_body() -> None:
    from pydantic import TypeAdapter

    from server.policy import engine_config as policy
    from server.protocol import CacheSpec

    fitted = {"mag_cache": {"mag_ratios": [1.0, 0.9]}}
    methods = set()
    for swept in calibrate.sweep_policies():
        spec = TypeAdapter(CacheSpec).validate_python(swept)
        config = policy.to_engine_config(spec, fitted, steps=20)
        assert config is not None
        # What the calibration file records is what a request reading it back runs.
        assert {k: v for k, v in policy.describe(config).items() if k in swept} == swept
        methods.add(swept["method"])
    assert len(methods) == 9


def test_the_model_card_shows_what_each_preset_runs_on_a_calibrated_model(server: LiveServer) -> None:
    calibration = load_calibration(calibration_path(server.runtime.settings.cache_dir, "tiny-flux"))
    with server.client() as client:
        cards = {card["id"]: card for card in client.get("/v1/models").json()["data"]}
        defaults = cards["tiny-flux"]["defaults"]
        fast = client.post(
            "/v1/generations", json={"model": "tiny-flux", "prompt": "a cat", "cache": {"preset": "fast"}}
        )
    guidance = defaults["guidance_scale"] > 1
    for name, floor in (("fast", 30.0), ("balanced", 35.0), ("quality", 40.0)):
        choice = calibration.choose(floor, defaults["steps"], guidance)
        assert choice is not None
        # The card writes the whole policy the calibrated point's fields run as.
        shown = cards["tiny-flux"]["presets"][name]
        assert {key: shown[key] for key in choice.point.policy} == dict(choice.point.policy)
    assert fast.status_code == 200, fast.text
    ran = {key: value for key, value in fast.json()["cache_policy"].items() if key != "target"}
    assert ran == cards["tiny-flux"]["presets"]["fast"]


@pytest.fixture(scope="module")
def adapter_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A LoRA adapter of the tiny Flux as diffusers writes one, with seeded random pairs."""
    from diffusers import FluxPipeline

    from tiny_pipelines import tiny_pipeline

    transformer = tiny_pipeline("flux").build().transformer
    generator = torch.Generator().manual_seed(7)
    state = {}
    for path, module in transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(("attn.to_q", "attn.to_v")):
            state[f"{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator) * 0.3
            state[f"{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator) * 0.3
    target = tmp_path_factory.mktemp("calibrated-lora")
    FluxPipeline.save_lora_weights(target, transformer_lora_layers=state)
    return target


@pytest.fixture(scope="module")
def adapted(calibrated: Path, adapter_folder: Path) -> Path:
    """``calibrated``, plus the tiny Flux's calibration with the adapter ``style`` applied."""
    model = load_model("tiny-flux", cache_dir=calibrated)
    assert model.adapters is not None
    model.adapters.load("style", str(adapter_folder))
    calibrate.calibrate(
        model,
        [calibrate.Setting(4, 1.0)],
        calibrate.calibration_prompts(2),
        calibration_path(calibrated, model.name, "style"),
        time_limit_s=600,
        policies=POLICIES,
        log=lambda line: None,
        adapter=("style", 1.0),
    )
    return calibrated


def test_a_calibration_with_an_adapter_is_the_adapted_models(adapted: Path) -> None:
    base = load_calibration(calibration_path(adapted, "tiny-flux"))
    with_adapter = load_calibration(calibration_path(adapted, "tiny-flux", "style"))
    assert base.adapter is None and with_adapter.adapter == ("style", 1.0)
    # Its own measurement: the one setting it ran, not the base model's curves.
    assert [(curve.steps, curve.guidance) for curve in with_adapter.curves] == [(4, False)]
    base_curve = next(curve for curve in base.curves if not curve.guidance)
    assert [point.psnr for point in with_adapter.curves[0].points] != [
        point.psnr for point in base_curve.points
    ]


def test_a_target_with_a_calibrated_adapter_uses_its_calibration(adapted: Path, adapter_folder: Path) -> None:
    with_adapter = load_calibration(calibration_path(adapted, "tiny-flux", "style"))
    body = {"model": "tiny-flux", "prompt": "a cat", "steps": 4, "guidance_scale": 1.0, "seed": 1}
    target = {"cache": {"target": {"min_psnr": 20.0}}}
    for served in live_server(adapted, models=["tiny-flux"], loras=[f"tiny-flux:style={adapter_folder}"]):
        with served.client() as client:
            answers = [
                client.post("/v1/generations", json={**body, **target, "loras": loras})
                for loras in ([{"name": "style"}], [{"name": "style", "scale": 0.5}], [])
            ]
    assert all(answer.status_code == 200 for answer in answers), [answer.text for answer in answers]
    calibrated, other_scale, base = (answer.json()["cache_policy"] for answer in answers)
    expected = with_adapter.curves[0].fastest(20.0)
    assert expected is not None and calibrated["method"] == expected.policy["method"]
    assert calibrated["target"]["outside_calibration"] is False
    assert calibrated["target"]["calibrated"]["adapter"] == {"name": "style", "scale": 1.0}
    # Another scale is not what was measured: the base model's numbers, said to be outside.
    assert other_scale["target"]["outside_calibration"] is True
    assert "adapter" not in other_scale["target"]["calibrated"]
    assert base["target"]["outside_calibration"] is False and "adapter" not in base["target"]["calibrated"]


def test_calibrating_with_an_adapter_needs_name_and_source(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="NAME=SOURCE"):
        calibrate.main(["--model", "tiny-flux", "--cache-dir", str(tmp_path), "--lora", "style"])
