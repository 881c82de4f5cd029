"""``ditcache`` as ``python -m server`` runs it, with each request's denoiser gated on a file.

For tests that drive the server in a subprocess, where no in-process Gate can reach. A denoiser call
made for request R waits until the file R exists in the folder named by ``$DITCACHE_TEST_GATES``, but
at most ``HOLD_S`` per call: a held request makes a step every ``HOLD_S`` at the fastest, however fast
the machine, and still reaches the end of each step, where cancellation is checked.

Run as ``python -m tests.server.gated_serve serve ...`` from the repository root.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from diffusers.models.modeling_utils import ModelMixin

from server.cli import main
from server.logs import request_id_var

GATES_ENV = "DITCACHE_TEST_GATES"
HOLD_S = 0.5


def _hold_until_let_go(gates: Path) -> Any:
    def hook(module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        # The denoiser alone: every diffusers transformer, not the VAE, the text encoders or the blocks.
        if not isinstance(module, ModelMixin) or "Transformer" not in type(module).__name__:
            return
        request_id = request_id_var.get()
        if request_id is None:
            return
        until = time.monotonic() + HOLD_S
        while not (gates / request_id).exists() and time.monotonic() < until:
            time.sleep(0.01)

    return hook


if __name__ == "__main__":
    # Global, so that it reaches the denoiser of whatever model the server loads, before it loads it.
    torch.nn.modules.module.register_module_forward_pre_hook(_hold_until_let_go(Path(os.environ[GATES_ENV])))
    raise SystemExit(main())
