"""Step callbacks: code a model family runs after every optimizer step and every evaluation.

Here, not in `families/base.py`, so modules that families build on (e.g. `lucatrain.contrastive`)
can define callbacks without importing the family registry.
"""

from __future__ import annotations


class StepCallback:
    """Runs on every rank after every optimizer step and after every evaluation; its state goes into
    each checkpoint (saved from rank 0, so it must be the same on every rank).

    `after_step` may change parameters through `engine.edit_parameter`, which keeps DeepSpeed's
    fp32 master copy and the working copy in agreement under every ZeRO stage. `after_evaluate`
    returning True stops training (early stopping): the run then saves and exports as at its end.
    `name` keys the state in the checkpoint, so each callback of a run needs its own.
    """

    name = "callback"

    def after_step(self, engine) -> None:
        """Called after every optimizer update (not after every micro-batch)."""

    def after_evaluate(self, results: dict[str, dict[str, float]]) -> bool:
        """Called with every evaluation's metrics by split; True stops training."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"callback {self.name} keeps no state, but the checkpoint has {sorted(state)}")
