"""Writing a folder so that readers find all of it or none of it."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def write_folder_atomically(folder: Path, write: Callable[[Path], None], *, replace: bool = False) -> None:
    """Call ``write`` on a staging folder beside ``folder``, then rename the staging folder to ``folder``.

    A crash or a failing ``write`` leaves ``folder`` as it was. Without ``replace``, a ``folder`` that
    exists by the time the rename comes (another writer finished the same folder first) is kept, and
    the staged copy dropped; with ``replace``, an existing ``folder`` is swapped for the new one, so it
    is always complete or, for the instant between two renames, absent.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        write(staging)
        staging.chmod(0o755)  # mkdtemp's 0700 would hide the folder from other users
        if replace:
            old = folder.with_name(f".{folder.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            if folder.exists():
                os.replace(folder, old)
            os.replace(staging, folder)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(staging, folder)
            except OSError:
                # Another writer finished first; its folder is as good as ours.
                if not folder.is_dir():
                    raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
