"""Why a run stopped early, as exception types the CLI turns into an exit code (no heavy imports)."""

from __future__ import annotations


class TrainingDiverged(ValueError):
    """The loss or a gradient went non-finite, or the loss exploded (`train.divergence_factor`)."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped the run after a committed checkpoint; `signal` says which."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signal = signum
