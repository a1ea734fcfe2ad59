"""Crash-safe checkpoints: stage, barrier, manifest, atomic rename, then the `latest` pointer.

Layout of `<output_dir>/checkpoints/`:

    step-000120/              one committed checkpoint
        ds/                   DeepSpeed's model/optimizer/scheduler shards (every rank writes its own)
        state/                everything else that survives a restart, in one dict (lucatrain.state):
                              trainer counters and world size, the family's resume record, the Task's
                              and callbacks' run state, the progress ledger (lucatrain.progress)
        export.json           what an offline export needs besides the weights (the family's record)
        rng/rank<R>.npz       every RNG state of rank R (python, numpy, torch CPU, CUDA), no pickle
        manifest.json         written last: every file with its size, the step, a ledger summary
    latest                    text file naming the newest committed checkpoint
    .staging-step-000130/     a checkpoint being written; never read by resume

A checkpoint counts only if its manifest exists and every listed file has the listed size; a
resume that finds `latest` broken walks back to the newest valid checkpoint, with a warning.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
from pathlib import Path

import numpy as np
import torch

from lucatrain import dist
from lucatrain.faults import kill_at
from lucatrain.monitor import get_logger
from lucatrain.progress import STORE, legacy_ledger_state
from lucatrain.state import read_state

MANIFEST = "manifest.json"
EXPORT_INFO = "export.json"  # the family's export record: what an offline export needs besides the weights
LATEST = "latest"
STAGING_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"  # a checkpoint being replaced by a new one of the same step


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def step_of(name: str) -> int:
    return int(name.rsplit("-", 1)[1])


# ---------------------------------------------------------------------------- RNG state


def save_rng_state(path: Path) -> None:
    """This process's RNG states as plain arrays (np.savez, loadable with allow_pickle=False)."""
    version, mt_state, gauss = random.getstate()
    np_state = np.random.get_state()
    arrays = {
        "python_mt": np.array(mt_state, dtype=np.int64),
        "python_meta": np.array([version, 0 if gauss is None else 1], dtype=np.int64),
        "python_gauss": np.array([0.0 if gauss is None else gauss], dtype=np.float64),
        "numpy_keys": np.asarray(np_state[1], dtype=np.uint32),
        "numpy_meta": np.array([np_state[2], np_state[3]], dtype=np.int64),
        "numpy_gauss": np.array([np_state[4]], dtype=np.float64),
        "torch_cpu": torch.get_rng_state().numpy(),
    }
    if torch.cuda.is_available():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            arrays[f"torch_cuda{i}"] = state.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as handle:
        np.savez(handle, **arrays)


def load_rng_state(path: Path) -> None:
    with np.load(path, allow_pickle=False) as data:
        version, has_gauss = (int(v) for v in data["python_meta"])
        gauss = float(data["python_gauss"][0]) if has_gauss else None
        random.setstate((version, tuple(int(v) for v in data["python_mt"]), gauss))
        pos, np_has_gauss = (int(v) for v in data["numpy_meta"])
        np.random.set_state(("MT19937", data["numpy_keys"], pos, np_has_gauss, float(data["numpy_gauss"][0])))
        torch.set_rng_state(torch.from_numpy(data["torch_cpu"].copy()))
        cuda = sorted(k for k in data.files if k.startswith("torch_cuda"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([torch.from_numpy(data[k].copy()) for k in cuda])


# ---------------------------------------------------------------------------- manifest


def file_checksum(path: Path) -> str:
    """xxh3-64 of a file's bytes (~10 GB/s), streamed in 8 MiB reads."""
    import xxhash  # a dependency of `datasets`, listed in setup.py too

    digest = xxhash.xxh3_64()
    with open(path, "rb") as handle:
        while chunk := handle.read(8 * 2**20):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(directory: Path, step: int, summary: dict) -> None:
    """Every file with its size and xxh3-64 checksum, so a resume can tell a corrupted shard (same size,
    other bytes) from a good one instead of loading it and training on NaN."""
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() and path.name != MANIFEST:
            files[str(path.relative_to(directory))] = {"size": path.stat().st_size, "xxh3_64": file_checksum(path)}
    # The ledger segments this checkpoint lists, beside it in the shared store: by size here (a resume
    # then reads none of them); their checksums are checked whenever one is read (lucatrain.progress).
    for segment in _ledger_segments(directory):
        files[f"../{STORE}/{segment['name']}"] = {"size": segment["size"]}
    manifest = {"step": step, "world_size": dist.world_size(), "ledger": summary, "files": files}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
    _fsync_file(tmp)
    os.replace(tmp, directory / MANIFEST)


def _ledger_segments(directory: Path) -> list[dict]:
    try:
        return json.loads((directory / "state" / "state.json").read_text()).get("ledger", {}).get("segments", [])
    except (OSError, ValueError):
        return []


def read_valid_manifest(directory: Path, verify: bool = False) -> dict | None:
    """The manifest if `directory` is a complete checkpoint, else None.

    Sizes are always compared; with `verify`, every file's checksum too (a resume does this for the
    checkpoint it loads; a mismatch is logged with the file's name). Manifests from before checksums
    hold sizes only and are checked by size.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        for rel, entry in manifest["files"].items():
            size, checksum = (entry, None) if isinstance(entry, int) else (entry["size"], entry.get("xxh3_64"))
            if (directory / rel).stat().st_size != size:
                return None
            if verify and checksum is not None and file_checksum(directory / rel) != checksum:
                get_logger().warning("%s does not match its checksum in %s (corrupted on disk?)", directory / rel, MANIFEST)
                return None
        return manifest
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


# ---------------------------------------------------------------------------- state


def read_checkpoint_state(path: Path) -> dict:
    """The state a checkpoint holds (`Trainer.state_dict`): `state/` (lucatrain.state), or the layout
    written before it, trainer_state.json + ledger/, which was always the LucaOne family's."""
    if (path / "state").is_dir() or not (path / "trainer_state.json").is_file():
        return read_state(path / "state")
    try:
        old = json.loads((path / "trainer_state.json").read_text())
        trainer = {k: old[k] for k in ("global_step", "best_metric", "world_size", "train_data", "fingerprint")}
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path / 'trainer_state.json'}: unreadable checkpoint state: {err!r}") from None
    family = {k: old[k] for k in ("tasks", "num_labels", "output_modes") if k in old}
    return {"trainer": {**trainer, "family": "lucaone_gplm"}, "family": family, "task": {}, "callbacks": {},
            "ledger": legacy_ledger_state(path / "ledger")}  # fmt: skip


# ---------------------------------------------------------------------------- commit & find


def maybe_fault(point: str, step: int) -> None:
    """Test hook: LUCATRAIN_FAULT=<point>:<step> kills this process with SIGKILL at that point;
    LUCATRAIN_FAULT=sigterm:<step> sends rank 0 alone a SIGTERM after that step (a scheduler's notice)."""
    kill_at(point, step)
    if point == "step" and os.environ.get("LUCATRAIN_FAULT") == f"sigterm:{step}" and dist.is_main():
        os.kill(os.getpid(), signal.SIGTERM)


def staging_dir(root: Path, step: int) -> Path:
    return root / f"{STAGING_PREFIX}{checkpoint_name(step)}"


def begin(root: Path, step: int) -> Path:
    """Rank 0 clears any stale staging directory of this step; all ranks then write into it."""
    stage = staging_dir(root, step)
    if dist.is_main():
        if stage.exists():
            shutil.rmtree(stage)
        stage.mkdir(parents=True)
    dist.barrier()
    return stage


def commit(root: Path, step: int, summary: dict, keep_last: int) -> Path:
    """After every rank wrote its files: manifest, rename into place, move `latest`, prune."""
    stage = staging_dir(root, step)
    final = root / checkpoint_name(step)
    dist.barrier()  # every rank's shards are on disk
    if dist.is_main():
        maybe_fault("before_manifest", step)
        write_manifest(stage, step, summary)
        retired = root / f"{RETIRED_PREFIX}{final.name}"
        if final.exists():
            # A re-run of the same step after a resume: the old checkpoint (perhaps the one `latest`
            # names) steps aside, still complete, until the new one is in place; a kill in between
            # leaves it for `find_resume_checkpoint`.
            if retired.exists():
                shutil.rmtree(retired)
            os.replace(final, retired)
            maybe_fault("after_retire", step)
        os.replace(stage, final)
        maybe_fault("before_latest", step)
        tmp = root / (LATEST + ".tmp")
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
        shutil.rmtree(retired, ignore_errors=True)
        prune(root, keep_last)
        prune_ledger_store(root)
    dist.barrier()
    return final


def committed(root: Path) -> list[Path]:
    """Committed checkpoint directories, oldest first (validity not checked)."""
    if not root.is_dir():
        return []
    return sorted((p for p in root.glob("step-*") if p.is_dir()), key=lambda p: step_of(p.name))


def prune_ledger_store(root: Path) -> None:
    """Delete the ledger segments (lucatrain.progress) that no checkpoint under `root` lists, and
    half-written ones; when a checkpoint's state cannot be read, nothing is deleted."""
    from lucatrain.progress import referenced_segments

    store = root / STORE
    if not store.is_dir():
        return
    referenced: set[str] = set()
    for path in root.iterdir():
        if path.is_dir() and (path.name.startswith("step-") or path.name.startswith(RETIRED_PREFIX)):
            try:
                state = json.loads((path / "state" / "state.json").read_text())
            except (OSError, ValueError):
                if (path / "trainer_state.json").is_file():  # the layout before state/: its ledger is inline
                    continue
                return
            referenced |= referenced_segments(state.get("ledger", {}))
    for segment in store.iterdir():
        if segment.name not in referenced:
            segment.unlink(missing_ok=True)


def prune(root: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` checkpoints (0 = all); never the one `latest` names."""
    if keep_last <= 0:
        return
    latest = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    for path in committed(root)[:-keep_last]:
        if path.name != latest:
            shutil.rmtree(path, ignore_errors=True)


def find_resume_checkpoint(root: Path, which: str) -> Path:
    """`which` is 'latest', a step number, or a checkpoint directory. Broken ones are skipped."""
    logger = get_logger()
    if which not in ("latest",) and not which.isdigit():
        path = Path(which)
        if read_valid_manifest(path, verify=True) is None:
            raise ValueError(f"`train.trained_checkpoint={which}`: not a complete lucatrain checkpoint (no valid {MANIFEST}, "
                             "or a file that does not match its checksum)")  # fmt: skip
        return path
    if which.isdigit():
        path = root / checkpoint_name(int(which))
        if read_valid_manifest(path, verify=True) is None:
            valid = [p.name for p in committed(root) if read_valid_manifest(p, verify=True) is not None]
            raise ValueError(f"`train.trained_checkpoint={which}`: {path} is missing or incomplete; valid: {valid} (files "
                             "that do not match their checksums count as incomplete)")  # fmt: skip
        return path
    named = (root / LATEST).read_text().strip() if (root / LATEST).exists() else None
    candidates = committed(root)
    if named is not None:
        # The pointer wins if valid; otherwise everything not newer than it is a candidate.
        target = root / named
        if read_valid_manifest(target, verify=True) is not None:
            return target
        retired = root / f"{RETIRED_PREFIX}{named}"
        if not target.exists() and read_valid_manifest(retired, verify=True) is not None:
            logger.warning("%s was being replaced when the run stopped; resuming from the complete old copy %s", target, retired)
            return retired
        logger.warning("checkpoint %s named by %s is incomplete; looking for an older one", target, root / LATEST)
    for path in reversed(candidates):
        if read_valid_manifest(path, verify=True) is not None:
            if named is not None and path.name != named:
                logger.warning("resuming from %s", path)
            return path
        logger.warning("ignoring incomplete checkpoint %s (no valid manifest)", path)
    raise ValueError(f"`train.trained_checkpoint=latest`: no complete checkpoint under {root}")
