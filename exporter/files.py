"""Output files appear whole or not at all."""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_outputs(*paths: Path):
    """Yield temporary paths beside `paths`; rename them into place only if the block succeeds."""
    temps = []
    try:
        for path in paths:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
            os.close(fd)
            temps.append(Path(tmp))
        yield temps
        umask = os.umask(0)
        os.umask(umask)
        for tmp, path in zip(temps, paths):
            os.chmod(tmp, 0o666 & ~umask)
            os.replace(tmp, path)
    finally:
        for tmp in temps:
            tmp.unlink(missing_ok=True)
