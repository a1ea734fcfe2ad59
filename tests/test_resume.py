"""Exact resume from `trained_checkpoint`: SIGKILL, torn checkpoints, changed world size and data."""


import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import LUCAONE_DEV, kill_step, launch, read_history, state_array_file, tiny_overrides
from lucatrain.checkpoint import read_valid_manifest
from lucatrain.progress import Ledger

pytestmark = pytest.mark.multiprocess

STEPS = 12


def args_for(run_root, **extra):
    values = {"train.max_steps": STEPS, "train.save_steps": 3, "train.loss_logging_steps": 1, "train.batch_size": 4,
              "train.num_train_epochs": 3, **extra}
    return ["train", "--config", "demo_tiny", *tiny_overrides(run_root, **values)]


def final_weights(run):
    return load_file(str(run / "last" / "model.safetensors"))


def final_ledger(run):
    latest = (run / "checkpoints" / "latest").read_text().strip()
    return Ledger.from_checkpoint(run / "checkpoints" / latest)


def assert_same_stream(a: Ledger, b: Ledger):
    assert a.steps == b.steps
    for epoch in set(a.epoch_ids) | set(b.epoch_ids):
        ids = a.consumed_ids(epoch)
        assert len(np.unique(ids)) == len(ids), f"an id was trained twice in epoch {epoch}"
        np.testing.assert_array_equal(ids, b.consumed_ids(epoch))


@pytest.fixture(scope="module")
def reference_runs(tmp_path_factory):
    """Uninterrupted 12-step runs on 2 processes, one per ZeRO config, made on first use."""
    runs = {}

    def get(zero="zero2", **extra):
        key = (zero, tuple(sorted(extra.items())))
        if key not in runs:
            root = tmp_path_factory.mktemp(f"reference-{zero}")
            launch(args_for(root, **{"deepspeed.config": zero}, **extra), nproc=2)
            runs[key] = root / "run"
        return runs[key]

    return get


@pytest.fixture(scope="module")
def uninterrupted(reference_runs):
    return reference_runs("zero2")


# LucaVirus's recipe trains with dropout 0.1 and DataLoader workers: resume must be exact with both.
DROPOUT_AND_WORKERS = {"model.hidden_dropout_prob": 0.1, "data.num_workers": 1}


@pytest.mark.parametrize("zero,extra", [("zero2", {}), ("zero3", {}), ("zero2", DROPOUT_AND_WORKERS)],
                         ids=["zero2", "zero3", "zero2-dropout-workers"])  # fmt: skip
def test_sigkill_at_random_step_then_resume_is_bitwise_exact(tmp_path, reference_runs, zero, extra):
    uninterrupted = reference_runs(zero, **extra)
    kill_at = kill_step(4, STEPS - 1)
    config = {"deepspeed.config": zero, **extra}
    launch(args_for(tmp_path, **config), nproc=2, env={"LUCATRAIN_FAULT": f"step:{kill_at}"}, expect_failure=True)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").exists(), f"killed at step {kill_at}"
    launch(args_for(tmp_path, **config, **{"train.trained_checkpoint": "latest"}), nproc=2)
    log = (run / "logs" / "training.log").read_text()
    # The fault fires right after step kill_at, before that step's own checkpoint (every 3 steps).
    assert f"resumed from {run / 'checkpoints' / f'step-{((kill_at - 1) // 3) * 3:06d}'}" in log, kill_at
    assert_same_stream(final_ledger(run), final_ledger(uninterrupted))
    want, got = final_weights(uninterrupted), final_weights(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} (killed at step {kill_at})")


def test_sigkill_while_writing_a_checkpoint_uses_the_previous_one(tmp_path, uninterrupted):
    launch(args_for(tmp_path), nproc=2, env={"LUCATRAIN_FAULT": "after_shards:6"}, expect_failure=True)
    run = tmp_path / "run"
    staging = run / "checkpoints" / ".staging-step-000006"
    assert (staging / "ds").is_dir() and not (staging / "manifest.json").exists()
    assert (run / "checkpoints" / "latest").read_text() == "step-000003"
    launch(args_for(tmp_path, **{"train.trained_checkpoint": "latest"}), nproc=2)
    assert "resumed from" in (run / "logs" / "training.log").read_text()
    assert read_valid_manifest(run / "checkpoints" / "step-000012") is not None
    assert_same_stream(final_ledger(run), final_ledger(uninterrupted))
    want, got = final_weights(uninterrupted), final_weights(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def test_checkpoint_without_manifest_is_skipped(tmp_path, uninterrupted):
    """A committed-looking directory whose manifest lies about a file is ignored, with a warning."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    victim = run / "checkpoints" / "step-000012" / "state" / "state.json"
    victim.write_text(victim.read_text() + " ")  # size no longer matches the manifest
    launch(args_for(tmp_path, **{"train.trained_checkpoint": "latest", "train.max_steps": 10}), nproc=2)
    log = (run / "logs" / "training.log").read_text()
    assert "is incomplete" in log and "resumed from" in log and "step-000009" in log


@pytest.mark.parametrize(
    "before,after,zero",
    [((2, 1), (1, 2), "zero2"), ((1, 2), (2, 1), "zero2"), ((2, 1), (1, 2), "zero3")],
    ids=["2to1", "1to2", "2to1-zero3"],
)
def test_changed_world_size_continues_the_global_stream(tmp_path, reference_runs, before, after, zero):
    """Global batch 8 = world x accumulation x 4, before and after; the stream must not notice."""
    uninterrupted = reference_runs(zero)
    (world0, accum0), (world1, accum1) = before, after
    launch(args_for(tmp_path, **{"train.gradient_accumulation_steps": accum0, "deepspeed.config": zero}),
           nproc=world0, env={"LUCATRAIN_FAULT": "step:7"}, expect_failure=True)  # fmt: skip
    run = tmp_path / "run"
    resume = {"train.trained_checkpoint": "latest", "train.gradient_accumulation_steps": accum1, "deepspeed.config": zero}
    launch(args_for(tmp_path, **resume), nproc=world1)
    log = (run / "logs" / "training.log").read_text()
    assert f"world_size={world1}" in log and "resumed from" in log
    # The global sample stream is exactly the uninterrupted 2-process run's.
    assert_same_stream(final_ledger(run), final_ledger(uninterrupted))
    # Loss continues the pre-kill curve: each step's loss matches the reference to float noise.
    reference = {h["step"]: h["gene_mask/loss"] for h in read_history(uninterrupted) if "gene_mask/loss" in h}
    # ZeRO-2 continues to float rounding: uninterrupted 1-process (accumulation 2) and 2-process runs
    # of the same global batches already differ by up to ~1e-7 relative per step (ZeRO-2 rounds each
    # rank's squared gradient norm to fp32, so the clip factor differs in its last bit), so 1e-6 is
    # the right bound, not bitwise. ZeRO-3 keeps the norm in fp64 and continues exactly once the
    # engine unshares Adam's step counter after the universal load (it drifted +0.24% before).
    tolerance = 1e-6
    for entry in read_history(run):
        if "gene_mask/loss" in entry:
            assert entry["gene_mask/loss"] == pytest.approx(reference[entry["step"]], rel=tolerance), entry["step"]


def test_appended_data_file_skips_seen_ids(tmp_path):
    """Resume after a new file joins the inputs: seen ids are not trained again this epoch, new ones are."""
    lines = LUCAONE_DEV.read_text().splitlines()
    first, second = tmp_path / "a.csv", tmp_path / "b.csv"
    first.write_text("\n".join(lines[:201]) + "\n")
    second.write_text("\n".join([lines[0], *lines[201:]]) + "\n")
    base = {"train.num_train_epochs": 1, "train.max_steps": 0, "train.lr_scheduler": "constant", "train.save_steps": 5}
    launch(args_for(tmp_path, **base, **{"data.train_files": f"[{first}]"}),
           nproc=1, launcher="python", env={"LUCATRAIN_FAULT": "step:27"}, expect_failure=True)  # fmt: skip
    run = tmp_path / "run"
    before = final_ledger(run).consumed_ids(0)
    assert len(before) == 25 * 4  # checkpoint at step 25, global batch 4
    launch(args_for(tmp_path, **base, **{"data.train_files": f"[{first}, {second}]", "train.trained_checkpoint": "latest"}),
           nproc=1, launcher="python")  # fmt: skip
    ids = final_ledger(run).consumed_ids(0)
    assert len(np.unique(ids)) == len(ids)
    np.testing.assert_array_equal(ids[: len(before)], before)
    log = (run / "logs" / "training.log").read_text()
    assert "skipped by id" in log
    # The 112 records of the new file were trained on after the resume.
    from lucatrain.data.prepared import load_prepared
    from lucatrain.state import read_state

    state = read_state(run / "checkpoints" / (run / "checkpoints" / "latest").read_text() / "state")["trainer"]
    data = load_prepared(state["train_data"])
    assert len(data) == 312 and len(ids) == 312  # the epoch covered old and new records exactly once
    new_file_ids = set(data.sample_ids[200:].tolist())  # b.csv's 112 records come after a.csv's 200
    trained_after = set(ids[len(before):].tolist())
    assert new_file_ids <= trained_after
    assert not (set(before.tolist()) & trained_after)


def audit(*args):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lucatrain", "audit", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_audit_reports_and_detects_a_duplicated_id(tmp_path, uninterrupted):
    import shutil

    clean = audit(uninterrupted, "--compare", uninterrupted)
    assert clean.returncode == 0, clean.stderr
    assert "epoch 0: consumed 96, unique 96, duplicates 0, never seen 216 of 312" in clean.stdout
    assert "epoch 0: same ids in the same order" in clean.stdout

    import json

    import xxhash

    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "checkpoints", run / "checkpoints")
    # The ids of steps 10-12 are the one segment that only step-000012 lists (the ledger store, lucatrain.progress).
    state_file = run / "checkpoints" / "step-000012" / "state" / "state.json"
    state = json.loads(state_file.read_text())
    last = [s for s in state["ledger"]["segments"] if s["kind"] == "ids"][-1]
    segment = run / "checkpoints" / "ledger" / last["name"]
    ids = np.load(segment)
    ids[5] = ids[4]  # same file size, other bytes
    np.save(segment, ids)
    # The checksum gives the tampering away: audit reads the previous checkpoint instead, and says why.
    skipped = audit(run)
    assert "does not match its checksum" in skipped.stderr and "consumed 72" in skipped.stdout
    # A ledger that records a duplicate in a checkpoint that is otherwise sound (its checksum and manifest rewritten):
    from lucatrain.checkpoint import MANIFEST, write_manifest

    last["xxh3_64"] = xxhash.xxh3_64_hexdigest(segment.read_bytes())
    state["ledger"]["segments"] = [last if s["name"] == last["name"] else s for s in state["ledger"]["segments"]]
    state_file.write_text(json.dumps(state))
    step12 = run / "checkpoints" / "step-000012"
    (step12 / MANIFEST).unlink()
    write_manifest(step12, 12, {})
    dirty = audit(run, "--compare", uninterrupted)
    assert dirty.returncode == 1
    assert "duplicates 1" in dirty.stdout and str(int(ids[4])) in dirty.stdout
    assert "epoch 0: runs diverge at position 77" in dirty.stdout  # 72 before the segment + 5


def test_sigterm_commits_the_current_step_and_resume_is_exact(tmp_path, uninterrupted):
    """A scheduler's SIGTERM to rank 0 alone: both ranks finish the step, commit it, and exit non-zero
    with one line; resuming ends bitwise equal to the uninterrupted run (before: the steps since the last
    save_steps were lost, with a traceback)."""
    signalled = kill_step(4, STEPS - 3)
    at = signalled + 1  # a signal is noticed at the end of the step it arrives in: the one after
    result = launch(args_for(tmp_path), nproc=2, env={"LUCATRAIN_FAULT": f"sigterm:{signalled}"}, expect_failure=True)
    run = tmp_path / "run"
    assert f"stopped by SIGTERM after step {at}: checkpoint step-{at:06d} is committed" in result.stderr
    assert (run / "checkpoints" / "latest").read_text() == f"step-{at:06d}"
    assert result.shm_left == []  # no DeepSpeed all-reduce buffer in /dev/shm
    launch(args_for(tmp_path, **{"train.trained_checkpoint": "latest"}), nproc=2)
    assert f"resumed from {run / 'checkpoints' / f'step-{at:06d}'}" in (run / "logs" / "training.log").read_text()
    assert_same_stream(final_ledger(run), final_ledger(uninterrupted))
    want, got = final_weights(uninterrupted), final_weights(run)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{name} (SIGTERM after step {at})")
