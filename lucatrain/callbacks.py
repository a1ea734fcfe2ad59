"""Step callbacks: code a model family runs after every optimizer step and every evaluation.

Here, not in `families/base.py`, so modules that families build on (e.g. `lucatrain.contrastive`)
can define callbacks without importing the family registry.
"""

from __future__ import annotations


class StepCallback:
    """Runs on every rank at the trainer's event points; its state goes into each checkpoint (saved
    from rank 0, so it must be the same on every rank). The events, in order:

        on_start(trainer)        training begins (after a resume has restored the state)
        after_step(engine)       after every optimizer update
        metrics(trainer, results) after every evaluation, before logging: more metrics {split: {name: value}}
        after_evaluate(results)  after every evaluation (with those metrics); True stops training
        after_save(path)         after every committed checkpoint (its directory)
        on_end(trainer)          after the last checkpoint and the `last/` export

    `after_step` may change parameters through `engine.edit_parameter`, which keeps DeepSpeed's
    fp32 master copy and the working copy in agreement under every ZeRO stage. `after_evaluate`
    returning True stops training (early stopping): the run then saves and exports as at its end.
    `name` keys the state in the checkpoint, so each callback of a run needs its own.
    """

    name = "callback"

    def on_start(self, trainer) -> None:
        """Called once when training begins (`trainer.global_step` is the resumed step)."""

    def after_step(self, engine) -> None:
        """Called after every optimizer update (not after every micro-batch)."""

    def after_save(self, path) -> None:
        """Called after every committed checkpoint, with its directory."""

    def on_end(self, trainer) -> None:
        """Called once at the end of a run that finished (not after an error)."""

    def metrics(self, trainer, results: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """Extra metrics of an evaluation by split (a metric callback), logged and seen by every
        `after_evaluate` and by early stopping; called on every rank, the values must agree."""
        return {}

    def after_evaluate(self, results: dict[str, dict[str, float]]) -> bool:
        """Called with every evaluation's metrics by split; True stops training."""
        return False

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        if state:
            raise ValueError(f"callback {self.name} keeps no state, but the checkpoint has {sorted(state)}")


class EarlyStopping(StepCallback):
    """Stop training when a dev metric has not improved by more than `min_delta` for `patience`
    evaluations in a row (PyTorch Lightning's EarlyStopping). `split`/`metric` name it in the results
    of an evaluation; `higher_is_better` its direction. The best value and the count of evaluations
    without improvement are saved in every checkpoint, so a resumed run keeps counting."""

    name = "early_stopping"

    def __init__(self, split: str, metric: str, higher_is_better: bool, patience: int, min_delta: float = 0.0):
        self.split, self.metric = split, metric
        self.higher_is_better, self.patience, self.min_delta = higher_is_better, patience, min_delta
        self.best: float | None = None
        self.waited = 0

    def after_evaluate(self, results: dict[str, dict[str, float]]) -> bool:
        value = results.get(self.split, {}).get(self.metric)
        if value is None:
            return False
        gain = (value - self.best if self.higher_is_better else self.best - value) if self.best is not None else float("inf")
        if gain > self.min_delta:
            self.best, self.waited = float(value), 0
        else:
            self.waited += 1
        return self.waited >= self.patience

    def state_dict(self) -> dict:
        return {"best": self.best, "waited": self.waited}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.waited = state.get("best"), int(state.get("waited", 0))


def load_callback(path: str) -> StepCallback:
    """A StepCallback from 'package.module:ClassName' (`train.callbacks`), built with no arguments."""
    import importlib

    module_name, _, class_name = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"`train.callbacks`: cannot load {path!r}: {err}") from None
    if not (isinstance(cls, type) and issubclass(cls, StepCallback)):
        raise ValueError(f"`train.callbacks`: {path!r} is not a lucatrain.callbacks.StepCallback subclass")
    return cls()
