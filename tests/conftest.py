"""Suite-wide settings."""

import os

import torch

# The tiny test models are dominated by per-op overhead, where extra intra-op threads only add
# contention (and, on a shared 2-core machine, make runs 10x slower). One thread also keeps
# reductions in one fixed order, so outputs compared bit for bit do not depend on the core count.
torch.set_num_threads(1)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
