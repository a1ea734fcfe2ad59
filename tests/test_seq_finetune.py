"""The second model family: sequence-level fine-tuning of an exported encoder, through the same loop.

Data: the shipped real rRNA genes labelled by their rRNA type (examples/data/rrna_type: 16S, 18S, 28S),
and for regression the GC fraction of those same real sequences (a label computed in the test).
"""

import json
import pickle

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file

from conftest import DATA, kill_step, launch, read_history
from lucatrain.cli import main as cli_main
from lucatrain.config import ConfigError, load_config
from lucatrain.data.prepared import prepare
from lucatrain.data.sources import RecordError
from lucatrain.export import write_export
from lucatrain.families.seq_finetune import SeqLabelRecipe, load_finetuned
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.task import EVAL_EPOCH
from lucatrain.trainer import Trainer

RRNA = DATA / "rrna_type"


def pretrained_encoder(directory):
    """A small encoder export as `lucatrain demo` writes one (random weights: only the plumbing matters)."""
    torch.manual_seed(0)
    config = LucaGPLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=256, hidden_dropout_prob=0.0)  # fmt: skip
    model = LucaGPLM(config)
    write_export(directory, config, model.state_dict())
    return directory


def finetune_overrides(tmp_path, encoder, **extra):
    values = {
        "model.model_type": "seq_finetune",
        "model.model_dirpath": encoder,
        "train.output_dir": tmp_path / "run",
        "data.cache_dir": tmp_path / "cache",
        "data.train_files": f"[{RRNA / 'train'}]",
        "data.dev_files": f"[{RRNA / 'dev'}]",
        "data.max_length": 130,
        "train.batch_size": 16,
        "train.max_steps": 40,
        "train.warmup_steps": 0,
        "train.lr_scheduler": "constant",
        "train.learning_rate": 3e-3,
        "train.loss_logging_steps": 10,
        "train.eval_steps": 20,
        "train.progress_bar": "false",
        "finetune.dropout": 0.0,
        "model.hidden_dropout_prob": 0.0,
        "finetune.classifier_size": 32,
        "deepspeed.precision": "fp32",
        "deepspeed.config": "zero2",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_labels_are_checked_at_prepare_naming_file_and_line(tmp_path):
    recipe = SeqLabelRecipe("multi_class", ["16S", "18S", "28S"])
    good = tmp_path / "good" / "a.csv"
    good.parent.mkdir()
    good.write_text("seq_id,seq_type,seq,label\ng1,gene,ACGT,2\ng2,gene,ACGTT,18S\n")
    data = prepare([good], tmp_path / "p1", recipe=recipe)
    assert data.rows([0, 1], ["label"])["label"] == [2, 1]  # an index, or a name of the label file
    for bad, message in (("5", "outside the label file's 3 classes"), ("5S", "neither a class index nor a name")):
        path = tmp_path / f"bad{bad}.csv"
        path.write_text(f"seq_id,seq_type,seq,label\ng1,gene,ACGT,0\ng2,gene,ACGT,{bad}\n")
        with pytest.raises(RecordError, match=f"{path}:3: .*{message}"):
            prepare([path], tmp_path / f"p-{bad}", recipe=recipe)
    number = tmp_path / "gc.csv"
    number.write_text("seq_id,seq_type,seq,label\ng1,gene,ACGT,0.5\ng2,gene,ACGT,high\n")
    with pytest.raises(RecordError, match=r"gc.csv:3: label 'high' is not a number"):
        prepare([number], tmp_path / "p-gc", recipe=SeqLabelRecipe("regression", None))
    # A LucaOne pretraining CSV is not a sequence-label file: refused by name, not read as something else.
    with pytest.raises(RecordError, match="is lucaone_csv, which the seq_finetune recipe does not read"):
        prepare([DATA / "lucaone_sample" / "dev" / "dev.csv"], tmp_path / "p-luca", recipe=recipe)


def test_config_of_the_family_is_checked():
    with pytest.raises(ConfigError, match=r"`finetune.output_mode` must be one of \['multi_class', 'binary_class', 'regression'\]"):
        load_config(None, ["model.model_type=seq_finetune", "finetune.output_mode=ranking"])
    with pytest.raises(ConfigError, match=r"model.model_type` must be one of \['clibd', 'clibd_finetune', 'lucaone_gplm', 'seq_finetune', 'simclr'\]"):
        load_config(None, ["model.model_type=clip"])


def test_finetune_trains_evaluates_exports_through_the_generic_loop(tmp_path):
    encoder = pretrained_encoder(tmp_path / "encoder")
    cfg = load_config("seq_finetune_rrna", finetune_overrides(
        tmp_path, encoder, **{"data.dev_splits": f"{{test: [{RRNA / 'test'}]}}", "train.best_metric": "test/acc",
                              "train.max_steps": 60, "train.eval_steps": 30}))
    trainer = Trainer(cfg)
    # The collator crosses into DataLoader workers (spawn pickles it): it must survive a round trip.
    rows = trainer.train_data.rows([0, 1, 2], trainer.columns)
    again = pickle.loads(pickle.dumps(trainer.collator))
    for key, value in trainer.collator(rows, 0).items():
        torch.testing.assert_close(again(rows, 0)[key], value, rtol=0, atol=0)
    result = trainer.train()
    history = result["history"]
    evals = [h for h in history if "eval/loss" in h]
    assert [h["step"] for h in evals] == [30, 60]
    # Both named splits are evaluated and logged under their names.
    assert {"eval/acc", "eval/macro_f1", "eval/test/acc", "eval/test/macro_f1"} <= set(evals[-1])
    # 600 of the 995 genes are 16S: predicting the majority gives 0.60. The fine-tuned model does far better.
    assert evals[-1]["eval/acc"] > 0.85, evals
    train_losses = [h["loss"] for h in history if "lr" in h]
    assert train_losses[-1] < 0.75 * train_losses[0]

    run = tmp_path / "run"
    # best/ follows the declared metric of the named split (accuracy: higher is better).
    best = json.loads((run / "best" / "trainer_state.json").read_text())
    assert best["test/acc"] == max(h["eval/test/acc"] for h in evals)
    # The export reproduces the final evaluation: encoder + head loaded without the trainer.
    task = load_finetuned(run / "last")
    split = trainer.dev_splits["dev"]
    with torch.no_grad():
        sums = {}
        for rows in np.array_split(split.rows, 4):
            batch = split.collate(split.data.rows(rows, split.columns), EVAL_EPOCH)
            _, report = task(batch, {"samples": float(len(rows))})
            for key, value in report.items():
                sums[key] = sums.get(key, 0) + value.double().numpy()
    assert task.summarize(sums)["acc"] == pytest.approx(evals[-1]["eval/acc"], abs=1e-12)
    assert task.summarize(sums)["loss"] == pytest.approx(evals[-1]["eval/loss"], rel=1e-5)
    # `lucatrain export` rebuilds the same weights offline from the checkpoint.
    assert cli_main(["export", str(run), "--out", str(tmp_path / "offline"), "--heads"]) == 0
    for name in ("model.safetensors", "heads.safetensors"):
        live, offline = load_file(run / "last" / name), load_file(tmp_path / "offline" / name)
        assert set(live) == set(offline)
        for key in live:
            np.testing.assert_array_equal(live[key], offline[key], err_msg=key)


def test_regression_mode_on_gc_fraction(tmp_path):
    """A numeric label: the GC fraction of the real rRNA sequences (first 128 nt, what the model sees)."""
    source = (RRNA / "train" / "train.csv").read_text().splitlines()[1:301]
    rows = ["seq_id,seq_type,seq,label"]
    for line in source:
        seq_id, kind, seq, _ = line.split(",")
        head = seq[:128]
        rows.append(f"{seq_id},{kind},{seq},{(head.count('G') + head.count('C')) / len(head):.4f}")
    train = tmp_path / "gc" / "train.csv"
    train.parent.mkdir()
    train.write_text("\n".join(rows) + "\n")
    encoder = pretrained_encoder(tmp_path / "encoder")
    overrides = finetune_overrides(tmp_path, encoder, **{"finetune.output_mode": "regression", "data.train_files": f"[{train}]",
                                                         "data.dev_files": f"[{train}]", "train.max_steps": 100,
                                                         "train.num_train_epochs": 10, "train.eval_steps": 50,
                                                         "train.best_metric": "mae", "finetune.pooling": "mean"})  # fmt: skip
    history = Trainer(load_config(None, overrides)).train()["history"]
    evals = [h for h in history if "eval/mae" in h]
    spread = np.std([float(r.rsplit(",", 1)[1]) for r in rows[1:]])
    assert evals[-1]["eval/mae"] < 0.6 * spread, (evals[-1], spread)  # better than predicting the mean
    assert evals[-1]["eval/r2"] > 0.3


def test_resume_refuses_a_checkpoint_with_another_head(tmp_path):
    encoder = pretrained_encoder(tmp_path / "encoder")
    Trainer(load_config(None, finetune_overrides(tmp_path, encoder, **{"train.max_steps": 2, "train.eval_steps": 0}))).train()
    mean = finetune_overrides(tmp_path, encoder, **{"train.max_steps": 4, "train.trained_checkpoint": "latest",
                                                    "finetune.pooling": "mean"})  # fmt: skip
    with pytest.raises(ValueError, match=r"step-000002 was written by a seq_finetune run with pooling='cls'; this run has pooling='mean'"):
        Trainer(load_config(None, mean))


def test_prepare_verb_for_the_family_and_a_prepared_dataset_of_other_labels_is_refused(tmp_path):
    """`lucatrain prepare --set model.model_type=seq_finetune` checks labels as training would; a dataset
    prepared with one label file is not silently read with another (its indices would mean other classes)."""
    prepared = tmp_path / "prepared"
    assert cli_main(["prepare", str(RRNA / "train"), "--out", str(prepared), "--set", "model.model_type=seq_finetune"]) == 0
    encoder = pretrained_encoder(tmp_path / "encoder")
    ok = finetune_overrides(tmp_path, encoder, **{"data.train_files": f"[{prepared}]", "train.max_steps": 2, "train.eval_steps": 0,
                                                  "finetune.label_file": RRNA / "label.txt"})  # fmt: skip
    assert Trainer(load_config(None, ok)).train()["global_step"] == 2
    renamed = tmp_path / "label.txt"
    renamed.write_text("label\n18S\n16S\n28S\n")  # the same names in another order: every index means another class
    other = finetune_overrides(tmp_path / "other", encoder, **{"data.train_files": f"[{prepared}]", "finetune.label_file": renamed})
    with pytest.raises(ValueError, match=r"prepared by the seq_finetune recipe with .*'16S', '18S'.*this run needs .*'18S', '16S'"):
        Trainer(load_config(None, other))


def test_frozen_encoder_under_zero3_exports_its_loaded_weights(tmp_path):
    """Linear probing under ZeRO-3: the frozen encoder has no fp32 master and is partitioned; the export
    must still hold it whole (the weights it was loaded with), and the head must have trained."""
    from lucatrain.export import HEADS_WEIGHTS

    encoder = pretrained_encoder(tmp_path / "encoder")
    overrides = finetune_overrides(tmp_path, encoder, **{"deepspeed.config": "zero3", "finetune.freeze_encoder": "true",
                                                         "train.max_steps": 5, "train.eval_steps": 0})  # fmt: skip
    trainer = Trainer(load_config(None, overrides))
    head_before = {k: v.clone() for k, v in trainer.engine.full_state_dict(trainer.task.heads).items()}
    trainer.train()
    exported, loaded = load_file(tmp_path / "run" / "last" / "model.safetensors"), load_file(encoder / "model.safetensors")
    assert set(exported) == set(loaded)
    for key in loaded:
        np.testing.assert_array_equal(exported[key], loaded[key], err_msg=key)
    heads = load_file(tmp_path / "run" / "last" / HEADS_WEIGHTS)
    moved = max(np.abs(heads[f"label.{k}"] - head_before[f"label.{k}"].numpy()).max() for k in ("hidden_layer.weight", "classifier.weight"))
    assert moved > 1e-4


@pytest.mark.multiprocess
def test_sigkill_at_a_random_step_then_resume_is_bitwise_exact(tmp_path):
    encoder = pretrained_encoder(tmp_path / "encoder")
    # A dev split of one record: on 2 ranks one of them evaluates only a padding batch (and must not hang).
    tiny = tmp_path / "tiny.csv"
    tiny.write_text("\n".join((RRNA / "dev" / "dev.csv").read_text().splitlines()[:2]) + "\n")
    common = {"train.max_steps": 10, "train.save_steps": 3, "train.eval_steps": 5, "train.batch_size": 4,
              "train.loss_logging_steps": 1, "data.dev_splits": f"{{tiny: [{tiny}]}}"}  # fmt: skip
    reference = tmp_path / "reference"
    launch(["train", *finetune_overrides(reference, encoder, **common)], nproc=2)
    at = kill_step(4, 9)
    killed = tmp_path / "killed"
    launch(["train", *finetune_overrides(killed, encoder, **common)], nproc=2, env={"LUCATRAIN_FAULT": f"step:{at}"},
           expect_failure=True)  # fmt: skip
    launch(["train", *finetune_overrides(killed, encoder, **common, **{"train.trained_checkpoint": "latest"})], nproc=2)
    assert "resumed from" in (killed / "run" / "logs" / "training.log").read_text()
    want, got = load_file(reference / "run" / "last" / "heads.safetensors"), load_file(killed / "run" / "last" / "heads.safetensors")
    want.update(load_file(reference / "run" / "last" / "model.safetensors"))
    got.update(load_file(killed / "run" / "last" / "model.safetensors"))
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} (killed at step {at})")
    steps = [h["loss"] for h in read_history(reference / "run") if "lr" in h]
    resumed = [h["loss"] for h in read_history(killed / "run") if "lr" in h]
    assert resumed[-1] == steps[-1]
    tiny_evals = [h for h in read_history(reference / "run") if "eval/tiny/loss" in h]
    assert [h["step"] for h in tiny_evals] == [5, 10] and all(h["eval/tiny/acc"] in (0.0, 1.0) for h in tiny_evals)
