"""How a request folds its adapters (``server.models.adapters``): into weights of its own, within its budget,
each the shared weight plus the update diffusers' ``fuse_lora`` would add; the shared weights untouched."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from server.models.adapters import Adapters, _Applied
from tiny_pipelines import tiny_pipeline


@pytest.fixture(scope="module")
def adapters(tmp_path_factory: pytest.TempPathFactory) -> Adapters:
    from diffusers import FluxPipeline

    pipeline = tiny_pipeline("flux").build()
    generator = torch.Generator().manual_seed(5)
    state = {}
    for path, module in pipeline.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and path.endswith(("attn.to_q", "ff.net.2")):
            state[f"{path}.lora_A.weight"] = torch.randn(4, module.in_features, generator=generator)
            state[f"{path}.lora_B.weight"] = torch.randn(module.out_features, 4, generator=generator)
    folder: Path = tmp_path_factory.mktemp("adapter")
    FluxPipeline.save_lora_weights(folder, transformer_lora_layers=state)
    loaded = Adapters(pipeline)
    loaded.load("first", str(folder))
    return loaded


def test_a_request_folds_each_module_its_adapters_touch_while_its_budget_lasts(adapters: Adapters) -> None:
    (adapter,) = adapters
    paths = sorted(adapter.modules)
    modules: dict[str, Any] = {path: adapters.transformer.get_submodule(path) for path in paths}
    sizes = {path: module.weight.numel() * module.weight.element_size() for path, module in modules.items()}
    # Room for the first module and not the second.
    first, second = paths[0], paths[1]
    applied = _Applied(((adapter, 0.5),), fold_bytes=sizes[first] + sizes[second] - 1)
    shared = modules[first].weight.detach().clone()
    folded = applied.folded(first, modules[first])
    assert folded is not None
    pair = adapter.modules[first]
    assert torch.equal(folded, shared + (pair.up @ pair.down) * (0.5 * pair.scaling))
    assert applied.folded(first, modules[first]) is folded
    assert applied.folded(second, modules[second]) is None
    # The shared weight is as it was.
    assert torch.equal(modules[first].weight, shared)


def test_a_module_none_of_a_requests_adapters_touch_is_not_copied(adapters: Adapters) -> None:
    (adapter,) = adapters
    untouched = next(
        path
        for path, module in adapters.transformer.named_modules()
        if isinstance(module, torch.nn.Linear) and path not in adapter.modules
    )
    applied = _Applied(((adapter, 1.0),), fold_bytes=2**30)
    module: Any = adapters.transformer.get_submodule(untouched)
    assert applied.folded(untouched, module) is None
