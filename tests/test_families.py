"""The family seam: the registry, the trainer's independence from any family, and callback state in checkpoints."""

import ast
import json
from pathlib import Path

import pytest

from conftest import REPO
from lucatrain.config import load_config
from lucatrain.families import FAMILIES, family_names, get_family, register_family
from lucatrain.families.base import StepCallback
from lucatrain.families.seq_finetune import SeqFinetuneFamily
from lucatrain.state import read_state
from lucatrain.trainer import Trainer
from test_seq_finetune import finetune_overrides, pretrained_encoder


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_the_trainer_and_the_data_layer_import_no_family():
    trainer = imported_modules(REPO / "lucatrain" / "trainer.py")
    assert "lucatrain.families" in trainer  # the registry only
    assert not {m for m in trainer if m.startswith(("lucatrain.families.", "lucatrain.models", "lucatrain.export"))}
    assert not {m for m in trainer if m.startswith("lucatrain.data.") and m not in ("lucatrain.data.batching", "lucatrain.data.prepared")}
    for path in (REPO / "lucatrain" / "data").glob("*.py"):
        assert not {m for m in imported_modules(path) if m.startswith("lucatrain.families")}, path


def test_registry_lists_the_families_and_names_them_on_a_bad_lookup():
    assert family_names() == ["clibd", "clibd_finetune", "lucaone_gplm", "seq_finetune", "simclr"]
    assert get_family("seq_finetune") is SeqFinetuneFamily
    with pytest.raises(ValueError, match=r"unknown model family 'clip' .* registered families are \['clibd', 'clibd_finetune', 'lucaone_gplm', 'seq_finetune', 'simclr'\]"):
        get_family("clip")
    with pytest.raises(ValueError, match="registered twice"):
        register_family(type("Impostor", (SeqFinetuneFamily,), {}))


class StepCounter(StepCallback):
    """Counts optimizer steps; its count must survive a restart through the checkpoint."""

    name = "step_counter"

    def __init__(self):
        self.steps = 0

    def after_step(self, engine) -> None:
        self.steps += 1

    def state_dict(self) -> dict:
        return {"steps": self.steps}

    def load_state_dict(self, state: dict) -> None:
        self.steps = state["steps"]


@pytest.fixture
def counting_family():
    """A family defined outside lucatrain, registered at run time: fine-tuning plus a stateful callback."""

    class CountingFinetune(SeqFinetuneFamily):
        name = "counting_finetune"

        def callbacks(self, task):
            self.counter = StepCounter()
            return [self.counter]

    register_family(CountingFinetune)
    yield CountingFinetune
    del FAMILIES["counting_finetune"]


def test_callback_state_goes_through_the_checkpoint_and_comes_back(tmp_path, counting_family):
    encoder = pretrained_encoder(tmp_path / "encoder")
    base = {"model.model_type": "counting_finetune", "train.max_steps": 4, "train.save_steps": 2, "train.eval_steps": 0,
            "train.save_total_limit": 0}  # fmt: skip
    first = Trainer(load_config(None, finetune_overrides(tmp_path, encoder, **base)))
    first.train()
    assert first.family.counter.steps == 4
    state = read_state(tmp_path / "run" / "checkpoints" / "step-000002" / "state")
    assert state["callbacks"] == {"step_counter": {"steps": 2}}
    assert state["trainer"]["family"] == "counting_finetune" and state["trainer"]["global_step"] == 2
    # Resume from step 2: the counter comes back at 2 and counts on to 6.
    more = {**base, "train.max_steps": 6, "train.trained_checkpoint": "2"}
    second = Trainer(load_config(None, finetune_overrides(tmp_path, encoder, **more)))
    assert second.family.counter.steps == 2 and second.global_step == 2
    second.train()
    assert second.family.counter.steps == 6
    # Another family cannot resume this run's checkpoint.
    other = {**more, "model.model_type": "seq_finetune"}
    with pytest.raises(ValueError, match="was written by a counting_finetune run; this run is seq_finetune"):
        Trainer(load_config(None, finetune_overrides(tmp_path, encoder, **other)))


class StopAtFirstEvaluation(StepCallback):
    """Early stopping at its simplest: the first evaluation ends the run."""

    name = "early_stop"

    def __init__(self):
        self.evaluations = 0

    def after_evaluate(self, results) -> bool:
        self.evaluations += 1
        return "dev" in results

    def state_dict(self) -> dict:
        return {"evaluations": self.evaluations}

    def load_state_dict(self, state: dict) -> None:
        self.evaluations = state["evaluations"]


def test_a_callback_can_stop_training_after_an_evaluation(tmp_path):
    class EarlyStopping(SeqFinetuneFamily):
        name = "early_stopping_finetune"

        def callbacks(self, task):
            return [StopAtFirstEvaluation()]

    register_family(EarlyStopping)
    try:
        encoder = pretrained_encoder(tmp_path / "encoder")
        overrides = finetune_overrides(tmp_path, encoder, **{"model.model_type": "early_stopping_finetune", "train.max_steps": 20,
                                                             "train.eval_steps": 5})  # fmt: skip
        trainer = Trainer(load_config(None, overrides))
        result = trainer.train()
        assert result["global_step"] == 5
        assert [h["step"] for h in result["history"] if "eval/loss" in h] == [5]  # evaluated once, not again at the end
        run = tmp_path / "run"
        assert (run / "checkpoints" / "latest").read_text() == "step-000005"
        state = read_state(run / "checkpoints" / "step-000005" / "state")
        assert state["callbacks"] == {"early_stop": {"evaluations": 1}}
        assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 5
    finally:
        del FAMILIES["early_stopping_finetune"]


def test_callbacks_need_distinct_names(tmp_path):
    class TwoCounters(SeqFinetuneFamily):
        name = "two_counters"

        def callbacks(self, task):
            return [StepCounter(), StepCounter()]

    register_family(TwoCounters)
    try:
        encoder = pretrained_encoder(tmp_path / "encoder")
        with pytest.raises(ValueError, match=r"callbacks need distinct names .* got \['step_counter', 'step_counter'\]"):
            Trainer(load_config(None, finetune_overrides(tmp_path, encoder, **{"model.model_type": "two_counters"})))
    finally:
        del FAMILIES["two_counters"]
