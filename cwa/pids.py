"""Whether a process id names a live process (stale-run detection, the mirror worker)."""

from __future__ import annotations

import os
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs. A process of another user counts as alive; a zombie (a
    finished child not yet reaped by its parent) does not."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][:1] != "Z"
    except OSError:  # no /proc (macOS): kill(pid, 0) said it exists
        return True
