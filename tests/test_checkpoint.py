"""Checkpoint commit protocol, retention, RNG states and the ledger format, in one process."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
import xxhash

from lucatrain import checkpoint
from lucatrain.progress import Ledger, audit
from lucatrain.state import read_state, write_state
from conftest import state_array_file


def fake_checkpoint(root, step, keep_last=0):
    stage = checkpoint.begin(root, step)
    (stage / "ds").mkdir()
    (stage / "ds" / "shard.pt").write_bytes(b"x" * (100 + step))
    return checkpoint.commit(root, step, {"samples_seen": step}, keep_last)


def test_commit_writes_manifest_then_latest(tmp_path):
    path = fake_checkpoint(tmp_path, 3)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["files"] == {"ds/shard.pt": {"size": 103, "xxh3_64": xxhash.xxh3_64(b"x" * 103).hexdigest()}}
    assert manifest["step"] == 3
    assert (tmp_path / "latest").read_text() == "step-000003"
    assert not list(tmp_path.glob(".staging-*"))


def test_retention_keeps_last_k_and_never_the_latest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path, step, keep_last=2)
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step-000003", "step-000004"]
    # `latest` pointing at an old checkpoint (e.g. set by hand) protects it from pruning.
    (tmp_path / "latest").write_text("step-000003")
    checkpoint.prune(tmp_path, 1)
    assert [p.name for p in checkpoint.committed(tmp_path)] == ["step-000003", "step-000004"]


def test_resume_skips_torn_checkpoints(tmp_path):
    for step in (3, 6):
        fake_checkpoint(tmp_path, step)
    (tmp_path / "step-000006" / "ds" / "shard.pt").write_bytes(b"short")  # torn after commit
    assert checkpoint.find_resume_checkpoint(tmp_path, "latest").name == "step-000003"
    with pytest.raises(ValueError, match="missing or incomplete; valid: \\['step-000003'\\]"):
        checkpoint.find_resume_checkpoint(tmp_path, "6")
    (tmp_path / "step-000003" / "manifest.json").unlink()
    with pytest.raises(ValueError, match="no complete checkpoint"):
        checkpoint.find_resume_checkpoint(tmp_path, "latest")


def test_rng_states_round_trip(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached gauss value in python's state
    checkpoint.save_rng_state(tmp_path / "rank0.npz")
    want = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.load_rng_state(tmp_path / "rank0.npz")
    got = (random.random(), random.gauss(0, 1), np.random.rand(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])
    with np.load(tmp_path / "rank0.npz", allow_pickle=False) as data:  # no pickle inside
        assert "torch_cpu" in data.files


def test_ledger_segments_grow_with_the_new_samples_and_a_load_reads_none(tmp_path, monkeypatch):
    """Each save writes the ids since the previous one (a segment per epoch, one of steps); loading
    reads no segment until ids are asked for; a corrupt segment is named; retention drops segments no
    checkpoint lists."""
    from lucatrain.checkpoint import prune_ledger_store
    from lucatrain.progress import STORE

    store = tmp_path / STORE
    ledger = Ledger()
    ledger.start_epoch(0, {"seed": 1}, "f" * 64)
    rng = np.random.default_rng(0)
    states, written = [], []
    position = 0
    for save in range(3):
        for step in range(10):
            ids = rng.integers(0, 2**62, 100)
            ledger.record_step(save * 10 + step + 1, 0, position, position + 100, ids, tokens=1000)
            position += 100
        before = sum(f.stat().st_size for f in store.glob("*")) if store.exists() else 0
        states.append(ledger.state_dict(store))
        written.append(sum(f.stat().st_size for f in store.glob("*")) - before)
    # 1,000 ids (8 kB) + 10 step rows per save, whatever the total before it.
    assert all(8000 < w < 9000 for w in written), written
    want = ledger.consumed_ids(0)
    reads = []
    real = Ledger._read
    monkeypatch.setattr(Ledger, "_read", lambda self, segment: reads.append(segment["name"]) or real(self, segment))
    again = Ledger.from_state_dict(states[-1], "checkpoint", store)
    assert reads == [] and again.summary() == ledger.summary()
    assert again.consumed_ids(0, 150).tolist() == want[:150].tolist() and len(reads) == 1  # one segment read
    np.testing.assert_array_equal(again.consumed_ids(0), want)
    np.testing.assert_array_equal(again.step_ids(25), want[2400:2500])
    # Corruption is named by the segment's path.
    victim = store / states[-1]["segments"][0]["name"]
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=rf"{victim.name}: progress ledger segment does not match its checksum or size"):
        Ledger.from_state_dict(states[-1], "checkpoint", store).consumed_ids(0)
    # Retention: only the segments the remaining checkpoints list stay.
    (store / "e0-orphan.npy").write_bytes(b"x")
    for step, state in ((10, states[0]), (30, states[-1])):
        write_state(tmp_path / f"step-{step:06d}" / "state", {"ledger": state})
    prune_ledger_store(tmp_path)
    assert sorted(f.name for f in store.iterdir()) == sorted(s["name"] for s in states[-1]["segments"])


def test_a_ledger_of_10_million_samples_checkpoints_by_what_is_new_and_audits_exactly(tmp_path):
    """Issue 12's size: 10 M consumed over two epochs (a run's history, in the segment store), then 1,000
    more. The next checkpoint writes those 1,000 ids and the steps since, not the 10 M; the reloaded
    ledger audits exactly (every id once per epoch, the ones never seen counted)."""
    from lucatrain.progress import STORE

    store = tmp_path / STORE
    rng = np.random.default_rng(12)
    dataset_ids = np.arange(6_000_000, dtype=np.int64) * 1_000_003 + 17  # 6 M distinct sample ids
    ledger = Ledger()
    for epoch, consumed in ((0, 6_000_000), (1, 4_000_000)):
        ledger.start_epoch(epoch, {"seed": 1}, "f" * 64)
        order = rng.permutation(dataset_ids.size)
        for step, part in enumerate(np.array_split(order[:consumed], 10)):
            start = ledger.cursor
            ledger.record_step(epoch * 10 + step + 1, epoch, start, start + part.size, dataset_ids[part], tokens=part.size)
        ledger.state_dict(store)  # a checkpoint at the end of each part of the history
    assert ledger.samples_seen == 10_000_000
    before = sum(f.stat().st_size for f in store.iterdir())
    new = dataset_ids[order[4_000_000:4_000_500]]  # epoch 1 goes on with ids it has not consumed yet
    ledger.record_step(21, 1, ledger.cursor, ledger.cursor + new.size, new, tokens=new.size)
    state = ledger.state_dict(store)
    written = sum(f.stat().st_size for f in store.iterdir()) - before
    assert written < 8 * new.size + 2000  # the new ids and one steps row, whatever came before
    write_state(tmp_path / "step-000021" / "state", {"ledger": state})
    again = Ledger.from_checkpoint(tmp_path / "step-000021")
    assert again.summary() == ledger.summary()
    report = audit(again, all_ids=dataset_ids)
    assert report[0] == {"consumed": 6_000_000, "unique": 6_000_000, "duplicates": [], "num_duplicates": 0, "never_seen": 0}
    assert report[1] == {"consumed": 4_000_000 + new.size, "unique": 4_000_000 + new.size, "duplicates": [], "num_duplicates": 0,
                         "never_seen": 2_000_000 - new.size}  # fmt: skip


def test_a_ledger_resumed_from_another_run_directory_brings_its_segments_along(tmp_path):
    """A run resumed from a checkpoint of another directory (train.trained_checkpoint=/other/run/...)
    writes checkpoints whose ledger lists the old run's segments too: they are linked into its own
    store, so its checkpoints stand on their own and audit exactly."""
    from lucatrain.progress import STORE

    old_store, new_store = tmp_path / "old" / STORE, tmp_path / "new" / STORE
    ledger = Ledger()
    ledger.start_epoch(0, {"seed": 1}, "f" * 64)
    ledger.record_step(1, 0, 0, 4, np.array([1, 2, 3, 4]), tokens=4)
    state = ledger.state_dict(old_store)
    resumed = Ledger.from_state_dict(state, "old checkpoint", old_store)
    resumed.record_step(2, 0, 4, 6, np.array([5, 6]), tokens=2)
    new_state = resumed.state_dict(new_store)
    shutil.rmtree(old_store)  # the old run is deleted: the new run's checkpoint must not need it
    again = Ledger.from_state_dict(new_state, "new checkpoint", new_store)
    assert again.consumed_ids(0).tolist() == [1, 2, 3, 4, 5, 6]
    assert again.all_steps() == [(1, 0, 0, 4, 4), (2, 0, 4, 6, 2)]
    assert audit(again, all_ids=np.arange(1, 8))[0]["never_seen"] == 1
    # A segment the old store lost is named, before anything is written that would list it.
    lost = Ledger.from_state_dict(new_state, "checkpoint", new_store)
    (new_store / new_state["segments"][0]["name"]).unlink()
    with pytest.raises(ValueError, match="a progress ledger segment of the checkpoint this run resumed from is missing"):
        lost.state_dict(tmp_path / "third" / STORE)


def test_ledger_round_trip_step_ids_and_audit(tmp_path):
    ledger = Ledger()
    ledger.start_epoch(0, {"seed": 1, "prefix": 0}, "f" * 64)
    ledger.record_step(1, 0, 0, 3, np.array([10, 11, 12]), tokens=30)
    ledger.record_step(2, 0, 3, 5, np.array([13, 14]), tokens=20)
    ledger.start_epoch(1, {}, "f" * 64)
    ledger.record_step(3, 1, 0, 2, np.array([14, 14]), tokens=20)
    write_state(tmp_path / "state", {"ledger": ledger.state_dict()})
    again = Ledger.from_checkpoint(tmp_path)
    assert again.summary() == ledger.summary() == {"epoch": 1, "cursor": 2, "samples_seen": 7, "tokens_seen": 70, "steps": 3}
    np.testing.assert_array_equal(again.step_ids(2), [13, 14])
    np.testing.assert_array_equal(again.step_ids(3), [14, 14])
    report = audit(again, all_ids=np.arange(10, 16))
    assert report[0] == {"consumed": 5, "unique": 5, "duplicates": [], "num_duplicates": 0, "never_seen": 1}
    assert report[1]["duplicates"] == [14] and report[1]["never_seen"] == 5
    # A torn ledger (epoch 0's ids replaced by epoch 1's) no longer adds up and is refused.
    state_dir = tmp_path / "state"
    first, second = (state_array_file(state_dir, "ledger", "epochs", e, "ids") for e in ("0", "1"))
    first.write_bytes(second.read_bytes())
    with pytest.raises(ValueError, match="in epoch 0 the ledger's steps consumed 5 samples but it holds 2 ids"):
        Ledger.from_checkpoint(tmp_path)


def test_state_round_trip_keeps_nested_values_and_arrays(tmp_path):
    state = {"trainer": {"global_step": 7, "best_metric": None, "names": ["a", "b"]},
             "ledger": {"epochs": {"0": {"ids": np.arange(5, dtype=np.int64)}}}, "empty": {},
             "task": {"gene_mask/tp": np.ones(3), "a.b": np.zeros(2), "a": {"b": np.full(2, 7.0)}}}  # fmt: skip
    write_state(tmp_path, state)
    again = read_state(tmp_path)
    np.testing.assert_array_equal(again["ledger"]["epochs"]["0"]["ids"], np.arange(5))
    # Keys with '/' or '.' are fine, and "a.b" and a -> b are two arrays, not one file twice.
    np.testing.assert_array_equal(again["task"]["gene_mask/tp"], np.ones(3))
    np.testing.assert_array_equal(again["task"]["a.b"], np.zeros(2))
    np.testing.assert_array_equal(again["task"]["a"]["b"], np.full(2, 7.0))
    assert again["trainer"] == state["trainer"] and again["empty"] == {}
    assert "__array__" in (tmp_path / "state.json").read_text()  # arrays live beside the JSON, not in it
    with pytest.raises(TypeError, match="must be a string"):
        write_state(tmp_path / "bad", {"epochs": {0: 1}})
    (tmp_path / "state.json").write_text("{not json")
    with pytest.raises(ValueError, match="state.json: unreadable checkpoint state"):
        read_state(tmp_path)


def test_a_checkpoint_being_replaced_stays_resumable(tmp_path):
    """Re-saving the step a run resumed from moves the old checkpoint aside before renaming the new one in,
    so a kill between the two renames still leaves a complete checkpoint for `latest`."""
    root = tmp_path / "checkpoints"
    for payload in (b"first", b"second"):
        stage = checkpoint.begin(root, 2)
        (stage / "weights.bin").write_bytes(payload)
        checkpoint.commit(root, 2, {}, keep_last=1)
    assert (root / "step-000002" / "weights.bin").read_bytes() == b"second"
    assert not list(root.glob(".retired-*"))  # retired once the new one was in place
    # The window a kill can leave: the old copy moved aside, the new one not yet renamed in.
    (root / "step-000002").rename(root / ".retired-step-000002")
    found = checkpoint.find_resume_checkpoint(root, "latest")
    assert found == root / ".retired-step-000002" and checkpoint.read_valid_manifest(found) is not None


def test_a_same_size_corruption_is_caught_by_the_checksum(tmp_path):
    """The manifest records each file's xxh3-64: a shard whose bytes changed but not its size (bit rot, a
    torn copy) makes `latest` fall back to the previous checkpoint instead of loading it."""
    root = tmp_path / "checkpoints"
    for step in (2, 4):
        stage = checkpoint.begin(root, step)
        (stage / "ds").mkdir()
        (stage / "ds" / "optim_states.pt").write_bytes(bytes(range(256)) * step)
        checkpoint.commit(root, step, {}, keep_last=0)
    manifest = json.loads((root / "step-000004" / "manifest.json").read_text())
    assert set(manifest["files"]["ds/optim_states.pt"]) == {"size", "xxh3_64"}
    shard = root / "step-000004" / "ds" / "optim_states.pt"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one flipped byte, same size
    shard.write_bytes(bytes(data))
    assert checkpoint.read_valid_manifest(root / "step-000004") is not None  # sizes still agree
    assert checkpoint.read_valid_manifest(root / "step-000004", verify=True) is None
    assert checkpoint.find_resume_checkpoint(root, "latest") == root / "step-000002"
    with pytest.raises(ValueError, match=r"step-000004 is missing or incomplete; valid: \['step-000002'\] \(files that do not match"):
        checkpoint.find_resume_checkpoint(root, "4")
