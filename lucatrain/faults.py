"""Test hooks that kill or break a process at a named point, set by LUCATRAIN_FAULT=<point>:<n>.

Here, apart from `checkpoint`, so that light modules (the data preparation and its worker
processes) can use them without importing torch.
"""

from __future__ import annotations

import os
import signal


def kill_at(point: str, step: int) -> None:
    """LUCATRAIN_FAULT=<point>:<step> kills this process with SIGKILL at that point."""
    if os.environ.get("LUCATRAIN_FAULT") == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def fault_at(point: str, step: int) -> bool:
    """Whether LUCATRAIN_FAULT=<point>:<step>[,<step>...] names this step (e.g. nan:3,4)."""
    fault = os.environ.get("LUCATRAIN_FAULT", "")
    name, _, steps = fault.partition(":")
    return name == point and str(step) in steps.split(",")
