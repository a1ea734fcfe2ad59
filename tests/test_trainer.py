"""The training loop in one process: accumulation equivalence, loss falls, exports load."""

import json

import numpy as np
import pytest
import torch

from conftest import LUCAONE_DEV, read_history, tiny_overrides
from lucatrain.config import ConfigError, load_config
from lucatrain.task import EVAL_EPOCH
from lucatrain.models.lucagplm import LucaGPLM
from lucatrain.optim import lr_multiplier
from lucatrain.trainer import Trainer


def run_steps(tmp_path, name, batch_size, accumulation, steps=3, zero="zero2"):
    cfg = load_config(
        "demo_tiny",
        tiny_overrides(
            tmp_path / name,
            **{"train.batch_size": batch_size, "train.gradient_accumulation_steps": accumulation, "train.max_grad_norm": 0.0,
               "deepspeed.config": zero},
        ),
    )
    trainer = Trainer(cfg)
    initial = trainer.engine.full_state_dict(trainer.family.model)
    losses, norms = [], []
    stream = trainer.steps()
    for _ in range(steps):
        *_, micro_batches = next(stream)
        assert len(micro_batches) == accumulation
        report = trainer.train_step(micro_batches)
        losses.append(report["gene_mask/loss_sum"] / report["gene_mask/count"])
        norms.append(trainer.engine.grad_norm())
    params = trainer.engine.full_state_dict(trainer.family.model)
    moved = max((params[n] - initial[n]).abs().max().item() for n in params)
    return losses, norms, params, moved


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_gradient_accumulation_matches_big_batch(tmp_path, zero):
    """4 micro-batches of 2 accumulate exactly the update of one micro-batch of 8 (same samples)."""
    small_losses, small_norms, small_params, moved = run_steps(tmp_path, "acc4", batch_size=2, accumulation=4, zero=zero)
    big_losses, big_norms, big_params, _ = run_steps(tmp_path, "acc1", batch_size=8, accumulation=1, zero=zero)
    np.testing.assert_allclose(small_losses, big_losses, rtol=1e-5)
    np.testing.assert_allclose(small_norms, big_norms, rtol=1e-5)
    for name in big_params:
        torch.testing.assert_close(small_params[name], big_params[name], rtol=1e-5, atol=1e-6, msg=name)
    # The comparison is not vacuous: three AdamW steps moved the weights by far more than the tolerance.
    assert moved > 1e-3


def test_lr_schedules_follow_lucaone_semantics():
    lin = [lr_multiplier(s, "linear", 10, 110, 1e-3, 1e-4) for s in range(0, 111)]
    assert lin[0] == pytest.approx(0.1) and lin[9] == pytest.approx(1.0)
    assert lin[10] == pytest.approx(1.0)
    assert lin[60] == pytest.approx(1.0 - 0.9 * 0.5)
    assert lin[110] == pytest.approx(0.1)  # lr2 / lr at max_steps
    cos = [lr_multiplier(s, "cosine", 0, 100, 1e-3, 0.0) for s in (0, 50, 100)]
    assert cos == pytest.approx([1.0, 0.5, 0.0], abs=1e-9)
    assert lr_multiplier(500, "constant", 10, 100, 1e-3, 0) == 1.0


def test_a_schedule_over_epochs_ends_at_the_last_epoch(tmp_path):
    """max_steps 0: the linear and cosine schedules reach lr2 at the end of num_train_epochs (in steps)."""

    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{"train.max_steps": 0, "train.num_train_epochs": 2,
                                                               "train.batch_size": 64, "train.lr_scheduler": "cosine",
                                                               "train.warmup_steps": 1, "train.lr2": 1e-5,
                                                               "train.loss_logging_steps": 1, "train.eval_steps": 0}))  # fmt: skip
    trainer = Trainer(cfg)
    per_epoch = len(trainer.epoch_plan(0))
    assert trainer.last_step == 2 * per_epoch > 2
    trainer.train()
    lrs = [h["lr"] for h in read_history(tmp_path / "run") if "lr" in h]
    assert len(lrs) == trainer.last_step
    peak = cfg.train.learning_rate
    # The lr logged at step s is the one the next update uses (the schedule has stepped).
    expected = [peak * lr_multiplier(step, "cosine", 1, trainer.last_step, peak, 1e-5) for step in range(1, trainer.last_step + 1)]
    np.testing.assert_allclose(lrs, expected, rtol=1e-6)
    assert lrs[0] == pytest.approx(peak) and lrs[-1] == pytest.approx(1e-5)
    too_long = tiny_overrides(tmp_path / "warm", **{"train.max_steps": 0, "train.num_train_epochs": 1, "train.batch_size": 64,
                                                    "train.warmup_steps": 1000})  # fmt: skip
    with pytest.raises(ConfigError, match=r"`train.warmup_steps` \(1000\) exceeds the run's \d+ steps"):
        Trainer(load_config("demo_tiny", too_long))


def test_periodic_evaluation_starts_after_eval_start_step(tmp_path):
    """CLIBD's eval_skip_epoch: no periodic evaluation up to train.eval_start_step; the final one always."""

    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{"train.max_steps": 8, "train.eval_steps": 2, "train.eval_start_step": 4,
                                                               "data.dev_files": f"[{LUCAONE_DEV}]", "train.batch_size": 4}))  # fmt: skip
    Trainer(cfg).train()
    evaluated = [h["step"] for h in read_history(tmp_path / "run") if any(k.startswith("eval/") for k in h)]
    assert evaluated == [6, 8]


def test_wandb_offline_logs_every_scalar_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    """logger.wandb_project: with the real wandb offline (WANDB_MODE=offline) the run is written under
    <run>/wandb and a resume writes into the same run id; with a recording stand-in for the module,
    every scalar reaches wandb.log at its step."""
    import importlib.machinery
    import importlib.util
    import sys
    import types

    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    base = {"train.loss_logging_steps": 1, "train.save_steps": 2, "logger.wandb_project": "lucatrain-test"}
    Trainer(load_config("demo_tiny", tiny_overrides(tmp_path, **base, **{"train.max_steps": 4}))).train()
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    Trainer(load_config("demo_tiny", tiny_overrides(tmp_path, **base, **{"train.max_steps": 6, "train.trained_checkpoint": "4"}))).train()
    assert len(sorted((tmp_path / "run" / "wandb").glob(f"offline-run-*-{run_id}"))) == 2
    assert (tmp_path / "run" / "wandb_run_id").read_text().strip() == run_id

    calls = {"init": [], "log": [], "finish": 0}
    stand_in = types.ModuleType("wandb")
    stand_in.__spec__ = importlib.machinery.ModuleSpec("wandb", None)

    class Run:
        def log(self, values, step):
            calls["log"].append((step, values))

        def finish(self):
            calls["finish"] += 1

    stand_in.init = lambda **kwargs: calls["init"].append(kwargs) or Run()
    monkeypatch.setitem(sys.modules, "wandb", stand_in)
    Trainer(load_config("demo_tiny", tiny_overrides(tmp_path / "fake", **base, **{"train.max_steps": 3}))).train()
    (init,) = calls["init"]
    assert init["project"] == "lucatrain-test" and init["name"] == "run" and init["resume"] == "allow"
    assert init["config"]["train"]["max_steps"] == 3 and calls["finish"] == 1
    logged = {step: values for step, values in calls["log"] if "train/lr" in values}
    history = {h["step"]: h for h in read_history(tmp_path / "fake" / "run") if "lr" in h}
    assert sorted(logged) == sorted(history) == [1, 2, 3]
    assert all(logged[s]["train/gene_mask/loss"] == history[s]["gene_mask/loss"] for s in history)

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r"`logger.wandb_project=x` needs wandb \(`pip install wandb`\)"):
        load_config("demo_tiny", ["logger.wandb_project=x"])


def test_short_training_loss_falls_and_exports_reload(tmp_path):
    overrides = tiny_overrides(
        tmp_path,
        **{
            "train.max_steps": 40,
            "train.num_train_epochs": 3,
            "train.batch_size": 8,
            "train.learning_rate": 3e-3,
            "train.loss_logging_steps": 5,
            "train.eval_steps": 20,
            "data.dev_files": f"[{LUCAONE_DEV}]",
        },
    )
    cfg = load_config("demo_tiny", overrides)
    trainer = Trainer(cfg)
    result = trainer.train()
    train_losses = [h["gene_mask/loss"] for h in result["history"] if "gene_mask/loss" in h]
    assert train_losses[-1] < 0.8 * train_losses[0]
    run = tmp_path / "run"
    for path in ("config.yaml", "logs/training.log", "last/model.safetensors", "best/model.safetensors", "history.jsonl"):
        assert (run / path).exists(), path
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    assert (run / "checkpoints" / "step-000040" / "manifest.json").is_file()
    assert (run / "checkpoints" / "latest").read_text() == "step-000040"

    # The exported `last/` model reproduces the final in-training evaluation exactly.
    evals = [h for h in result["history"] if "eval/loss" in h]
    final_eval = evals[-1]["eval/gene_mask/loss"]
    model = LucaGPLM.from_pretrained(run / "last").eval()
    data = trainer.dev_data["dev"]
    sums = [0.0, 0]
    with torch.no_grad():
        for rows in np.array_split(np.arange(len(data)), 10):
            batch = trainer.collator(data.rows(rows), EVAL_EPOCH)
            hidden = model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
            sel = (batch["labels"] != -100) & (batch["token_type_ids"] == 0)
            logits = model.mlm_logits(hidden[sel])
            sums[0] += torch.nn.functional.cross_entropy(logits, batch["labels"][sel], reduction="sum").item()
            sums[1] += int(sel.sum())
    assert sums[0] / sums[1] == pytest.approx(final_eval, rel=1e-4)
    assert json.loads((run / "last" / "trainer_state.json").read_text())["global_step"] == 40


def test_lora_trains_only_adapters_and_exports_merged_weights(tmp_path):
    from lucatrain.families.lucaone import build_model
    from lucatrain.trainer import seed_everything

    overrides = tiny_overrides(
        tmp_path,
        **{"train.max_steps": 5, "train.learning_rate": 1e-2, "lora.enabled": "true", "lora.r": 4,
           "lora.target_modules": "[q_proj, v_proj]"},
    )
    cfg = load_config("demo_tiny", overrides)
    seed_everything(cfg.train.seed)
    initial = build_model(cfg).state_dict()
    trainer = Trainer(cfg)
    trainable = {n for n, p in trainer.family.model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    trainer.train()
    exported = LucaGPLM.from_pretrained(tmp_path / "run" / "last").state_dict()
    assert set(exported) == set(initial)
    # Frozen weights are bit-identical; adapted projections moved by the merged low-rank update.
    torch.testing.assert_close(exported["layers.0.fc1.weight"], initial["layers.0.fc1.weight"], rtol=0, atol=0)
    torch.testing.assert_close(exported["layers.0.self_attn.k_proj.weight"], initial["layers.0.self_attn.k_proj.weight"], rtol=0, atol=0)
    delta = exported["layers.0.self_attn.q_proj.weight"] - initial["layers.0.self_attn.q_proj.weight"]
    assert delta.abs().max() > 1e-4
    assert torch.linalg.matrix_rank(delta).item() <= 4


def test_deepspeed_checkpoint_loads_back(tmp_path):
    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{"train.max_steps": 6, "train.save_steps": 3}))
    Trainer(cfg).train()
    exported = LucaGPLM.from_pretrained(tmp_path / "run" / "last").state_dict()

    fresh = Trainer(load_config("demo_tiny", tiny_overrides(tmp_path / "fresh", **{"train.seed": 99})))
    before = fresh.engine.full_state_dict(fresh.family.model)
    assert not torch.equal(before["embed_tokens.weight"], exported["embed_tokens.weight"])
    fresh.engine.load(tmp_path / "run" / "checkpoints" / "step-000006", "ds")
    loaded = fresh.engine.full_state_dict(fresh.family.model)
    for name, value in exported.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0, msg=name)


def test_training_starts_from_a_lucaone_checkpoint(tmp_path):
    """model_dirpath pointing at a LucaOne checkpoint-step<N>/ sets the sizes and the initial weights."""
    from test_lucaone_checkpoint import lucaone_config, lucaone_state_dict, write_checkpoint

    from lucatrain.families.lucaone import build_model

    state = lucaone_state_dict(layers=3)
    write_checkpoint(tmp_path / "checkpoint-step100", state, lucaone_config(layers=3))
    base = {"model.model_dirpath": tmp_path / "checkpoint-step100", "train.max_steps": 3}
    model = build_model(load_config("demo_tiny", tiny_overrides(tmp_path, **base)))
    assert model.config.num_hidden_layers == 3
    torch.testing.assert_close(model.layers[2].fc1.weight, state["layers.2.fc1.weight"], rtol=0, atol=0)
    # LucaVirus-style: a 2-layer model from the first 2 layers of the 3-layer checkpoint.
    smaller = load_config("demo_tiny", tiny_overrides(tmp_path, **base, **{"model.init_first_n_layers": "true"}))
    model = build_model(smaller)
    assert model.config.num_hidden_layers == 2
    torch.testing.assert_close(model.layers[1].fc2.weight, state["layers.1.fc2.weight"], rtol=0, atol=0)
    # And a short real run starts from it and logs what was loaded and skipped.
    Trainer(smaller).train()
    log = (tmp_path / "run" / "logs" / "training.log").read_text()
    assert "initialised from LucaOne checkpoint" in log and "layers.2." in log


def test_a_checkpoint_in_the_layout_before_families_still_resumes(tmp_path):
    """Checkpoints written before lucatrain.state (trainer_state.json + ledger/) resume and give the same
    weights as the run that wrote them continuing (1 process, fp32, no dropout: bitwise)."""
    import shutil

    import numpy as np
    from safetensors.numpy import load_file

    from lucatrain import checkpoint
    from lucatrain.state import read_state

    common = {"train.max_steps": 6, "train.save_steps": 3, "train.save_total_limit": 0, "train.batch_size": 4}
    Trainer(load_config("demo_tiny", tiny_overrides(tmp_path / "a", **common))).train()
    root = tmp_path / "b" / "run" / "checkpoints"
    shutil.copytree(tmp_path / "a" / "run" / "checkpoints" / "step-000003", root / "step-000003")
    old = root / "step-000003"
    from lucatrain.progress import Ledger

    state = read_state(old / "state")
    # Today's ledger keeps its ids in the run's segment store; the old layout held them all inline.
    ledger = Ledger.from_state_dict(state["ledger"], "a", tmp_path / "a" / "run" / "checkpoints" / "ledger").state_dict()
    (old / "ledger").mkdir()
    np.save(old / "ledger" / "steps.npy", ledger["steps_table"])
    for epoch, info in ledger["epochs"].items():
        np.save(old / "ledger" / f"ids_epoch{epoch}.npy", info["ids"])
    meta = {k: ledger[k] for k in ("version", "epoch", "cursor", "order_key", "samples_seen", "tokens_seen")}
    meta["epochs"] = {e: {"samples": len(info["ids"]), "fingerprint": info["fingerprint"]} for e, info in ledger["epochs"].items()}
    (old / "ledger" / "ledger.json").write_text(json.dumps(meta))
    trainer_state = {k: state["trainer"][k] for k in ("global_step", "best_metric", "world_size", "train_data", "fingerprint")}
    (old / "trainer_state.json").write_text(json.dumps({**trainer_state, **state["family"]}))
    shutil.rmtree(old / "state")
    (old / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(old, 3, {})
    (root / "latest").write_text("step-000003")
    resumed = Trainer(load_config("demo_tiny", tiny_overrides(tmp_path / "b", **common, **{"train.trained_checkpoint": "latest"})))
    assert resumed.global_step == 3 and resumed.ledger.samples_seen == 12
    resumed.train()
    want, got = load_file(tmp_path / "a" / "run" / "last" / "model.safetensors"), load_file(tmp_path / "b" / "run" / "last" / "model.safetensors")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_zero0_bf16_exports_the_fp32_masters(tmp_path):
    """ZeRO-0 in bf16 keeps fp32 masters in DeepSpeed's unfused optimizer: the export reads those, not the
    bf16 working copy (which would round every weight to 8 bits of mantissa)."""
    cfg = load_config("demo_tiny", tiny_overrides(tmp_path, **{"deepspeed.config": "zero0", "deepspeed.precision": "bf16",
                                                               "train.max_steps": 2, "train.learning_rate": 1e-2}))  # fmt: skip
    trainer = Trainer(cfg)
    trainer.train()
    state = trainer.engine.full_state_dict(trainer.family.model)
    weight = state["layers.0.fc1.weight"]
    assert weight.dtype == torch.float32
    assert not torch.equal(weight, weight.bfloat16().float())  # holds values no bf16 number has
    working = dict(trainer.family.model.named_parameters())["layers.0.fc1.weight"]
    assert working.dtype == torch.bfloat16
    torch.testing.assert_close(weight.bfloat16(), working.detach().cpu(), rtol=0, atol=0)  # the master rounds to it
    # The offline export reads the same masters from the checkpoint.
    from safetensors.torch import load_file

    from lucatrain.cli import main as cli_main

    assert cli_main(["export", str(tmp_path / "run"), "--out", str(tmp_path / "offline")]) == 0
    offline, live = load_file(tmp_path / "offline" / "model.safetensors"), load_file(tmp_path / "run" / "last" / "model.safetensors")
    assert set(offline) == set(live)
    for key in live:
        torch.testing.assert_close(offline[key], live[key], rtol=0, atol=0, msg=key)


def test_log_lines_never_land_inside_the_progress_bar(tmp_path, capsys):
    """Issue 9: with the tqdm bar shown, each console log line starts on a line of its own (before: the
    bar's text and a log line shared one line)."""
    from lucatrain.monitor import ConsoleHandler, Monitor, setup_logging

    logger = setup_logging(tmp_path)
    monitor = Monitor(tmp_path, total_steps=4, use_tensorboard=False, progress_bar=True)
    monitor.advance(1, {"loss": 3.2})
    logger.info("first line while the bar is shown")
    monitor.advance(1, {"loss": 3.1})
    logger.warning("second line while the bar is shown")
    monitor.close()
    assert not ConsoleHandler.bar_shown
    logger.info("a line after the bar")
    err = capsys.readouterr().err
    for text in ("first line while", "second line while", "a line after the bar"):
        [line] = [line for line in err.split("\n") if text in line]
        shown = line.split("\r")[-1]  # what a terminal shows: the text after the last carriage return
        assert shown.startswith("20") and "[rank0]" in shown and "train:" not in shown, repr(line)
    setup_logging(None)
