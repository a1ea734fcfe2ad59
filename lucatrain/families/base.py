"""The Family base class: what a model family tells the generic trainer.

The trainer calls, in this order (one Family instance per run, on every rank):

    family = Family(cfg, logger)
    recipe = family.prepare_recipe(split)        schema + record checks -> the prepared datasets (split:
                                                 None for training, else the dev split's name)
    family.setup(train_data, dev_data)           decide what to train from the data (labels, tasks)
    task = family.build_task(resume_from)        the nn.Module DeepSpeed wraps (a lucatrain.task.Task)
    callbacks = family.callbacks(task)           run after every optimizer step (may edit parameters)
    collate = family.collator()                  rows -> tensors, seeded by (seed, epoch, sample id)
    rows = family.trainable_rows(data)           which rows of a dataset this run uses
    ... the loop: task.train_step(micro_batches, engine), task.evaluate(splits, engine) ...
    family.resume_state() / check_resume(saved, path)   what a checkpoint must agree on to be resumed
    family.export_info(task) / export(...)       what best/, last/ and `lucatrain export` write

Everything has a default except `build_task`, `collator` and `export`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lucatrain.callbacks import StepCallback  # noqa: F401  (part of the family interface)
from lucatrain.data.prepared import BASE_RECIPE, PrepareRecipe


class Family:
    name: str = ""
    config_sections: dict[str, type] = {}
    """Config sections this family reads (`cfg.<section>`), registered with the family."""

    def __init__(self, cfg, logger):
        self.cfg = cfg
        self.logger = logger

    # ------------------------------------------------------------------ config

    @classmethod
    def check_config(cls, cfg) -> None:
        """Cross-section checks at config time (raise ConfigError naming the key)."""

    # ------------------------------------------------------------------ data

    def prepare_recipe(self, split: str | None = None) -> PrepareRecipe:
        """How the files of the training data (`split` None) or of a dev split become rows; the same
        recipe for every split unless the family's splits differ (e.g. groups of one HDF5 file)."""
        return BASE_RECIPE

    def setup(self, train_data, dev_data: dict) -> None:
        """Inspect the prepared datasets before the model is built (e.g. count labels)."""

    def trainable_rows(self, data) -> np.ndarray:
        """The rows an epoch plans over, sorted and distinct (the trainer takes all N of them to be 0..N-1)."""
        return np.arange(len(data))

    def order_key(self) -> dict:
        """Whatever else the epoch's sample order depends on (it enters the ledger's order key)."""
        return {}

    def columns(self) -> tuple[str, ...] | None:
        """The prepared columns the collator reads (None: all)."""
        return None

    def collator(self) -> Callable[[dict, int], dict]:
        raise NotImplementedError(f"family {self.name} must implement collator()")

    # ------------------------------------------------------------------ model

    def build_task(self, resume_from: Path | None = None) -> torch.nn.Module:
        """The Task module; `resume_from` is the checkpoint this run will load (its weights replace
        whatever the Task starts with, so build the architecture that checkpoint holds)."""
        raise NotImplementedError(f"family {self.name} must implement build_task()")

    def describe(self) -> str:
        """One log line about the model (parameter counts), written at start-up."""
        return ""

    def callbacks(self, task) -> list[StepCallback]:
        return []

    # ------------------------------------------------------------------ resume

    def resume_state(self) -> dict:
        """What a checkpoint records so a later run can tell whether it may resume from it."""
        return {}

    def check_resume(self, saved: dict, path: Path) -> None:
        """Raise ValueError, naming `path`, when this run cannot resume from a checkpoint whose
        `resume_state()` was `saved`."""
        ours = json.loads(json.dumps(self.resume_state()))  # as the checkpoint stores it, so the two compare
        differ = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        if differ:
            theirs = ", ".join(f"{k}={saved.get(k)!r}" for k in differ)
            mine = ", ".join(f"{k}={ours.get(k)!r}" for k in differ)
            raise ValueError(f"{path} was written by a {self.name} run with {theirs}; this run has {mine}. Resume with the "
                             "same settings, or start a new run from its export with `model.model_dirpath`")  # fmt: skip

    # ------------------------------------------------------------------ export

    def export_info(self, task) -> dict:
        """What an export needs besides the weights (JSON), stored in every checkpoint as export.json."""
        return {}

    @classmethod
    def export(cls, directory: Path, state: dict[str, torch.Tensor], info: dict, with_heads: bool = True) -> None:
        """Write an export directory from the Task's full fp32 state dict (rank 0 only)."""
        raise NotImplementedError(f"family {cls.name} must implement export()")
