"""The embedded models: deterministic builds, a save/load round trip, tokenizers that need no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from server.models.builtin import BUILTIN_MODELS, materialize
from tiny_pipelines import DEFAULT_SEED
from tiny_pipelines.tokenizers import clip_tokenizer, t5_tokenizer

# Built from a recipe; a shipped model (``folder``) has its own tests in tests/shapes.
NAMES = tuple(name for name, model in BUILTIN_MODELS.items() if model.folder is None)
PROMPTS = ("a small red circle at the top on a blue background", "Zebra crossing, 3 times!", "")
REPO = Path(__file__).resolve().parents[2]


def _weights(pipeline: object) -> dict[str, dict[str, torch.Tensor]]:
    components = pipeline.components  # type: ignore[attr-defined]
    return {
        name: module.state_dict()
        for name, module in components.items()
        if isinstance(module, torch.nn.Module)
    }


def _assert_same_weights(a: object, b: object) -> None:
    weights_a, weights_b = _weights(a), _weights(b)
    assert weights_a.keys() == weights_b.keys()
    for component, state in weights_a.items():
        other = weights_b[component]
        assert state.keys() == other.keys(), component
        for key, tensor in state.items():
            assert torch.equal(tensor, other[key]), f"{component}.{key}"


@pytest.mark.parametrize("name", NAMES)
def test_build_is_deterministic_and_leaves_the_global_rng_alone(name: str) -> None:
    rng_before = torch.random.get_rng_state()
    first = BUILTIN_MODELS[name].build()
    second = BUILTIN_MODELS[name].build()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    _assert_same_weights(first, second)


def test_the_seed_changes_the_weights_and_the_folder() -> None:
    model = BUILTIN_MODELS["tiny-wan"]
    default = model.build(DEFAULT_SEED).transformer.state_dict()
    other = model.build(DEFAULT_SEED + 1).transformer.state_dict()
    assert any(not torch.equal(tensor, other[key]) for key, tensor in default.items())
    assert model.fingerprint(DEFAULT_SEED) != model.fingerprint(DEFAULT_SEED + 1)


def test_every_word_is_one_t5_token_and_other_text_still_tokenizes() -> None:
    tokenizer = t5_tokenizer()
    prompt = PROMPTS[0]
    assert len(tokenizer(prompt).input_ids) == len(prompt.split()) + 1  # and </s>
    assert tokenizer.unk_token_id not in tokenizer("Zebra crossing, 3 times!").input_ids
    assert clip_tokenizer().unk_token_id not in clip_tokenizer()("zebra crossing").input_ids[1:-1]


@pytest.mark.parametrize("name", NAMES)
def test_materialized_folder_round_trips_through_from_pretrained(name: str, tmp_path: Path) -> None:
    from diffusers import DiffusionPipeline

    model = BUILTIN_MODELS[name]
    folder = materialize(model, tmp_path)
    assert folder == tmp_path / "builtin" / f"{name}-{model.fingerprint()}"
    built = model.build()
    assert json.loads((folder / "model_index.json").read_text())["_class_name"] == type(built).__name__

    loaded = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    assert type(loaded) is type(built)
    _assert_same_weights(built, loaded)
    for component in ("tokenizer", "tokenizer_2"):
        if component not in built.components:
            continue
        original, reloaded = built.components[component], loaded.components[component]
        assert reloaded.model_max_length == original.model_max_length
        for prompt in PROMPTS:
            assert reloaded(prompt).input_ids == original(prompt).input_ids

    # Nothing is left behind, and a second call reuses the folder instead of building again.
    assert [path.name for path in (tmp_path / "builtin").iterdir()] == [folder.name]
    stamp = (folder / "model_index.json").stat().st_mtime_ns
    assert materialize(model, tmp_path) == folder
    assert (folder / "model_index.json").stat().st_mtime_ns == stamp


def test_a_fresh_process_imports_lightly_and_loads_builtins_offline(tmp_path: Path) -> None:
    # A fresh interpreter: the hub libraries read HF_HUB_OFFLINE once, when they are imported, and
    # only there can the import of the server's modules be seen on its own.
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        import server.models.generation
        from server.models.registry import load_model
        heavy = {"diffusers", "transformers"} & set(sys.modules)
        assert not heavy, f"importing the registry imported {heavy}"

        from server.models.builtin import BUILTIN_MODELS
        from tiny_pipelines.tokenizers import clip_tokenizer, t5_tokenizer

        expected = {"CLIPTokenizer": clip_tokenizer(), "T5Tokenizer": t5_tokenizer()}
        for name in (name for name, model in BUILTIN_MODELS.items() if model.folder is None):
            pipeline = load_model(name, cache_dir=Path(sys.argv[1])).pipeline
            for component in ("tokenizer", "tokenizer_2"):
                tokenizer = pipeline.components.get(component)
                if tokenizer is None:
                    continue
                reference = expected[type(tokenizer).__name__]
                for prompt in sys.argv[2:]:
                    assert tokenizer(prompt).input_ids == reference(prompt).input_ids, (name, prompt)
        print("loaded offline")
        """
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HOME": str(tmp_path / "hf-home"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    }
    completed = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "cache"), *PROMPTS],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "loaded offline" in completed.stdout
    assert not (tmp_path / "hf-home" / "hub").exists()
