"""What lucatrain refuses instead of silently doing something else (issue: trust what a run did)."""

import json

import pytest
import torch

from conftest import read_history, tiny_overrides
from lucatrain.cli import main as cli_main
from lucatrain.config import ConfigError, load_config
from lucatrain.trainer import Trainer


def short_run(tmp_path, **extra):
    values = {"train.max_steps": 4, "train.save_steps": 2, "train.batch_size": 4, "train.loss_logging_steps": 1, **extra}
    return load_config("demo_tiny", tiny_overrides(tmp_path, **values))


def snapshot(run):
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*")) if p.is_file()}


def test_a_second_run_into_a_run_directory_is_refused_and_changes_nothing(tmp_path):
    Trainer(short_run(tmp_path)).train()
    run = tmp_path / "run"
    before = snapshot(run)
    with pytest.raises(ValueError, match=r"run already holds a run; resume it with `train.trained_checkpoint=latest`.*overwrite_output_dir=true"):
        Trainer(short_run(tmp_path, **{"train.learning_rate": 1e-3}))
    assert snapshot(run) == before  # not a byte written: config.yaml, checkpoints, history, logs


def test_overwrite_starts_over_without_mixing(tmp_path):
    Trainer(short_run(tmp_path, **{"train.max_steps": 6})).train()
    run = tmp_path / "run"
    assert (run / "checkpoints" / "step-000006").is_dir()
    Trainer(short_run(tmp_path, **{"train.overwrite_output_dir": "true"})).train()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002", "step-000004"]
    assert [h["step"] for h in read_history(run) if "lr" in h] == [1, 2, 3, 4]  # only the new run's curve
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1


def test_overwrite_only_clears_run_directories(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds files but no lucatrain run"):
        Trainer(short_run(tmp_path, **{"train.overwrite_output_dir": "true"}))
    assert (tmp_path / "run" / "thesis.tex").read_text() == "years of work"


def test_an_empty_output_dir_is_an_error_not_the_current_directory():
    with pytest.raises(ConfigError, match="`train.output_dir` is empty"):
        load_config("demo_tiny", ["train.output_dir="])


def test_a_run_that_fails_on_its_data_writes_no_config(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("obj_id,obj_type,obj_seq,obj_label\np1,prot,MKV*Q!,{}\n")
    with pytest.raises(ValueError, match=r"bad.csv:2: invalid prot residue '!'"):
        Trainer(short_run(tmp_path, **{"data.train_files": f"[{bad}]"}))
    assert not (tmp_path / "run" / "config.yaml").exists()
    # Through the CLI, as a batch job runs it: one line on stderr, and the same reason in the run's log.
    args = ["train", "--config", "demo_tiny", *tiny_overrides(tmp_path, **{"data.train_files": f"[{bad}]"})]
    assert cli_main(args) == 2
    assert "bad.csv:2: invalid prot residue '!'" in (tmp_path / "run" / "logs" / "training.log").read_text()
    # Fixed, the same command runs in the same directory: a failed start does not make it "taken".
    bad.write_text("obj_id,obj_type,obj_seq,obj_label\np1,prot,MKVQ,{}\n" * 1 + "".join(f"p{i},prot,MKVLA,{{}}\n" for i in range(2, 40)))
    Trainer(short_run(tmp_path, **{"data.train_files": f"[{bad}]"})).train()
    assert (tmp_path / "run" / "config.yaml").exists()


def test_export_refuses_a_non_empty_out_directory(tmp_path, capsys):
    Trainer(short_run(tmp_path)).train()
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(out)]) == 2
    assert "--out" in capsys.readouterr().err and (out / "notes.txt").read_text() == "keep me"
    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "fresh")]) == 0
    assert json.loads((tmp_path / "fresh" / "config.json").read_text())["hidden_size"] == 32


def test_resume_follows_a_changed_learning_rate_and_schedule(tmp_path):
    """Resuming to lower the learning rate after a spike must train at the new rate (the issue's repro)."""
    first = {"train.max_steps": 4, "train.warmup_steps": 1, "train.lr_scheduler": "linear", "train.learning_rate": 2e-3,
             "train.lr2": 2e-4, "train.eval_steps": 0}  # fmt: skip
    Trainer(short_run(tmp_path, **first)).train()
    resumed = {**first, "train.max_steps": 8, "train.trained_checkpoint": "latest", "train.learning_rate": 1e-5,
               "train.lr2": 0, "train.lr_scheduler": "constant"}  # fmt: skip
    trainer = Trainer(short_run(tmp_path, **resumed))
    trainer.train()
    lrs = {h["step"]: h["lr"] for h in read_history(tmp_path / "run") if "lr" in h}
    assert [lrs[s] for s in (5, 6, 7, 8)] == [1e-5] * 4
    assert lrs[4] > 1e-4  # the first run's decaying schedule, as it was
    assert "learning rate peak [0.002] -> 1e-05" in (tmp_path / "run" / "logs" / "training.log").read_text()


def test_auto_resume_starts_fresh_then_resumes(tmp_path):
    """`trained_checkpoint=auto`: one command a scheduler can rerun after a preemption at any moment."""
    run = tmp_path / "run"
    # A first attempt that died before its first checkpoint left a config, logs and a partial history.
    run.mkdir()
    (run / "config.yaml").write_text("train: {}\n")
    (run / "history.jsonl").write_text(json.dumps({"step": 1, "loss": 99.0}) + "\n")
    auto = {"train.trained_checkpoint": "auto", "train.max_steps": 4}
    fresh = Trainer(short_run(tmp_path, **auto))
    assert fresh.resume_from is None and fresh.global_step == 0
    fresh.train()
    assert [h["step"] for h in read_history(run) if "lr" in h] == [1, 2, 3, 4]  # the dead attempt's line is gone
    assert "no complete checkpoint" in (run / "logs" / "training.log").read_text()
    again = Trainer(short_run(tmp_path, **{**auto, "train.max_steps": 6}))
    assert again.resume_from == run / "checkpoints" / "step-000004" and again.global_step == 4
    again.train()
    assert [h["step"] for h in read_history(run) if "lr" in h] == [1, 2, 3, 4, 5, 6]


def test_resume_at_or_past_max_steps_trains_nothing_and_rewrites_nothing(tmp_path):
    Trainer(short_run(tmp_path)).train()
    run = tmp_path / "run"
    before = {k: v for k, v in snapshot(run).items() if not k.startswith("logs/")}
    trainer = Trainer(short_run(tmp_path, **{"train.trained_checkpoint": "latest", "train.max_steps": 3}))
    assert trainer.train()["global_step"] == 4
    after = {k: v for k, v in snapshot(run).items() if not k.startswith("logs/") and k != "config.yaml"}
    assert after == {k: v for k, v in before.items() if k != "config.yaml"}  # checkpoints, exports, history untouched
    assert "nothing to train" in (run / "logs" / "training.log").read_text()


def test_a_learning_rate_typo_stops_the_run_without_committing(tmp_path):
    """lr 1000 instead of 1e-3: the loss explodes; the run must fail and keep the last good checkpoint as
    `latest`, with no export of the diverged weights (before: exit 0, NaN committed and exported)."""
    Trainer(short_run(tmp_path, **{"train.max_steps": 2})).train()
    run = tmp_path / "run"
    good = snapshot(run / "checkpoints")
    typo = {"train.trained_checkpoint": "latest", "train.max_steps": 30, "train.learning_rate": 1000.0,
            "train.max_grad_norm": 0.0, "train.save_steps": 5}  # fmt: skip
    from lucatrain.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"training diverged at step \d+: .*the last checkpoint, step-000002, is kept"):
        Trainer(short_run(tmp_path, **typo)).train()
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-000002"]
    assert snapshot(run / "checkpoints") == good
    assert not (run / "last").exists() or json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 2


def test_a_finite_loss_explosion_counts_as_divergence(tmp_path):
    """The guard on logged losses: 7.5 -> 1e8 is finite but is not training (train.divergence_factor=100)."""
    import logging

    from lucatrain.errors import TrainingDiverged

    shell = Trainer.__new__(Trainer)  # the check needs only the config, the logger and the run directory
    shell.cfg, shell.logger, shell.run_dir = short_run(tmp_path), logging.getLogger("test"), tmp_path / "run"
    shell.lowest_loss, shell.global_step = None, 10
    for loss in (7.5, 6.0, 5.0, 400.0):  # 80x the lowest: tolerated
        shell.check_divergence(loss)
    shell.global_step = 40
    with pytest.raises(TrainingDiverged, match=r"step 40: the training loss 1e\+08 is over 100 times its lowest 5 .*no checkpoint was written"):
        shell.check_divergence(1e8)
    shell.cfg.train.divergence_factor = 0.0  # off
    shell.check_divergence(1e12)


def test_unclear_errors_become_one_line_with_the_remedy(tmp_path, capsys):
    import torch

    from lucatrain.data.sources import RecordError, iter_records
    from lucatrain.families.lucaone.labels import read_label_file

    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"`deepspeed.precision=fp16` needs a CUDA device .* choose fp32 or bf16"):
            load_config("demo_tiny", ["deepspeed.precision=fp16"])
    # A label file saved by a spreadsheet starts with a byte-order mark: read like the CSV reader does.
    labels = tmp_path / "prot_site.txt"
    labels.write_bytes("\ufefflabel\nA\nB\n".encode("utf-8"))
    assert read_label_file(labels) == ["A", "B"]
    # A .json input holding one array is not JSON Lines: say so.
    array = tmp_path / "records.json"
    array.write_text(json.dumps([{"obj_id": "g1", "obj_type": "gene", "obj_seq": "ACGT"}]))
    [error] = list(iter_records(array))
    assert isinstance(error, RecordError) and "JSON Lines: one object per line" in str(error)
    # model_dirpath at a run directory (not its export) when starting a new run.
    Trainer(short_run(tmp_path)).train()
    with pytest.raises(ValueError, match=r"is a lucatrain run directory: start from its export \(.*best or .*last\)"):
        Trainer(short_run(tmp_path / "second", **{"model.model_dirpath": tmp_path / "run"}))
    # `lucatrain audit RUN/checkpoints` is accepted like RUN.
    assert cli_main(["audit", str(tmp_path / "run" / "checkpoints")]) == 0
    assert "epoch 0: consumed 16" in capsys.readouterr().out


def test_protein_tasks_on_gene_only_data_name_the_cause(tmp_path):
    genes = tmp_path / "genes.csv"
    genes.write_text("obj_id,obj_type,obj_seq,obj_label\n" + "".join(f"g{i},gene,ACGTACGT,{{}}\n" for i in range(40)))
    with pytest.raises(ValueError, match=r"tasks \['prot_mask'\] train on prot records, but the training data \(40 records\) holds none"):
        Trainer(short_run(tmp_path, **{"data.train_files": f"[{genes}]", "tasks.names": "[prot_mask]"}))


def test_a_run_started_from_pretrained_weights_resumes_with_that_encoder(tmp_path):
    """Sizes and token_dropout come from the weights (the export, then the run's own checkpoint), never
    from the recipe's model.* (before: a size mismatch traceback, or token_dropout silently switched)."""
    import yaml

    from lucatrain.export import write_export
    from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig

    config = LucaGPLMConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                            max_position_embeddings=256, token_dropout=False, hidden_dropout_prob=0.0)  # fmt: skip
    write_export(tmp_path / "pretrained", config, LucaGPLM(config).state_dict())
    recipe = {"model.model_dirpath": tmp_path / "pretrained", "model.hidden_size": 64, "model.num_attention_heads": 4,
              "model.token_dropout": "true", "train.max_steps": 2}  # fmt: skip
    Trainer(short_run(tmp_path, **recipe)).train()
    run = tmp_path / "run"
    log = (run / "logs" / "training.log").read_text()
    assert "model.hidden_size=64 -> 32" in log and "model.token_dropout=True -> False" in log
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert (saved["hidden_size"], saved["token_dropout"], saved["intermediate_size"]) == (32, False, 64)  # what the model is
    resumed = Trainer(short_run(tmp_path, **{**recipe, "train.max_steps": 4, "train.trained_checkpoint": "latest"}))
    assert resumed.family.model.config.hidden_size == 32 and resumed.family.model.config.token_dropout is False
    assert resumed.train()["global_step"] == 4
    exported = json.loads((run / "last" / "config.json").read_text())
    assert (exported["hidden_size"], exported["token_dropout"]) == (32, False)


def test_an_output_dir_that_cannot_be_created_names_the_path(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(ValueError, match=r"`train.output_dir=.*a_file/run` cannot be used: "):
        Trainer(load_config("demo_tiny", tiny_overrides(tmp_path, **{"train.output_dir": blocker / "run"})))


# ------------------------------------------------------------------ train.nonfinite=skip


def _bf16_run(tmp_path, name, **extra):
    return short_run(tmp_path / name, **{"deepspeed.precision": "bf16", "deepspeed.config": "zero2", "train.save_steps": 0, **extra})


def _weights(run) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "last" / "model.safetensors"))


def test_nonfinite_skip_drops_the_update_and_trains_on(tmp_path, monkeypatch):
    """A step whose gradients are NaN (injected into its loss) is skipped as DeepSpeed's fp16 loss scaler
    would: the weights after it are bitwise those of the step before, and the run goes on."""
    Trainer(_bf16_run(tmp_path, "reference", **{"train.max_steps": 2})).train()
    monkeypatch.setenv("LUCATRAIN_FAULT", "nan:3")
    skipping = Trainer(_bf16_run(tmp_path, "skipping", **{"train.max_steps": 3, "train.nonfinite": "skip"}))
    result = skipping.train()
    reference, skipped = _weights(tmp_path / "reference" / "run"), _weights(tmp_path / "skipping" / "run")
    assert all(torch.equal(reference[k], skipped[k]) for k in reference)
    assert [h["skipped"] for h in result["history"] if "skipped" in h] == ["step 3: non-finite grad_norm"]
    assert skipping.ledger.samples_seen == 3 * 4  # its samples count as consumed
    log = (tmp_path / "skipping" / "run" / "logs" / "training.log").read_text()
    assert "step 3: non-finite grad_norm; the update was skipped (train.nonfinite=skip)" in log and "done: 3 steps" in log
    # One step later the run trains again: the fourth step's update is applied.
    monkeypatch.setenv("LUCATRAIN_FAULT", "nan:3")
    more = Trainer(_bf16_run(tmp_path, "on", **{"train.max_steps": 4, "train.nonfinite": "skip"}))
    more.train()
    on = _weights(tmp_path / "on" / "run")
    assert more.engine.skipped_steps == 1 and any(not torch.equal(on[k], reference[k]) for k in reference)


def test_nonfinite_stop_is_the_default_for_the_same_step(tmp_path, monkeypatch):
    monkeypatch.setenv("LUCATRAIN_FAULT", "nan:3")
    from lucatrain.errors import TrainingDiverged

    with pytest.raises(TrainingDiverged, match=r"training diverged at step 3: non-finite grad_norm"):
        Trainer(_bf16_run(tmp_path, "stop", **{"train.max_steps": 4})).train()


def test_too_many_skipped_steps_in_a_row_stop_the_run(tmp_path, monkeypatch):
    from lucatrain.errors import TrainingDiverged

    monkeypatch.setenv("LUCATRAIN_FAULT", "nan:2,3")
    cfg = _bf16_run(tmp_path, "persistent", **{"train.max_steps": 4, "train.nonfinite": "skip", "train.max_consecutive_skips": 2,
                                                "train.save_steps": 1})  # fmt: skip
    with pytest.raises(TrainingDiverged, match=r"step 3: non-finite grad_norm, 2 skipped steps in a row \(train.max_consecutive_skips\)"):
        Trainer(cfg).train()
    run = tmp_path / "persistent" / "run"
    assert (run / "checkpoints" / "latest").read_text() == "step-000002"  # step 2 was skipped but is not NaN: it commits
    assert not (run / "last").exists()


@pytest.mark.parametrize("precision, zero", [("fp32", "zero2"), ("bf16", "zero3"), ("bf16", "zero0")])
def test_nonfinite_skip_is_refused_where_deepspeed_cannot_drop_a_step(tmp_path, precision, zero):
    cfg = short_run(tmp_path, **{"deepspeed.precision": precision, "deepspeed.config": zero, "train.nonfinite": "skip"})
    with pytest.raises(ValueError, match=rf"`train.nonfinite=skip` needs DeepSpeed to drop a non-finite step.*this run has {precision} at stage {zero[-1]}"):
        Trainer(cfg)
    assert not (tmp_path / "run" / "config.yaml").exists()
