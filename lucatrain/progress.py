"""The progress ledger: which sample ids each optimizer step consumed, and where the stream stands.

Stored with every checkpoint, under `ledger` in the checkpoint's state (`<checkpoint>/state/`,
`lucatrain.state`): the identity of the stream in state.json (epoch, cursor, order_key, counters, per
epoch the samples consumed and the data fingerprint), and the ids and steps themselves as **segments**
in a store beside the checkpoints (`checkpoints/ledger/`):

    e<E>-<start>-<end>-<hash>.npy    int64: the ids consumed at positions [start, end) of epoch E's order
    steps-<first>-<last>-<hash>.npy  int64 (k, 5): global_step, epoch, start, end, tokens of those steps

A checkpoint writes only what was consumed since the previous one (one segment of each kind) and lists
its segments with their sizes and checksums, so its cost grows with the samples since the last
checkpoint, not with the run's total. Segments are immutable and shared by the checkpoints that list
them; retention deletes those no retained checkpoint lists. Loading a ledger reads no segment: ids and
steps are read (and their checksums checked) only when asked for (`consumed_ids`, `step_ids`,
`lucatrain audit`), which a resume with the same order never does. Ledgers stored inline (every id in
the checkpoint's own state, as before) load too.

The cursor counts samples of the current epoch's order already trained on. Resuming with the same
order continues at the cursor; with a different one (data changed, or a token-budget plan cut for
another world size) the consumed ids are excluded from a new plan of the epoch, by id only.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LEDGER_VERSION = 1


STORE = "ledger"  # the segment store's directory name, beside the checkpoints


@dataclass
class Ledger:
    epoch: int = 0
    cursor: int = 0
    """Samples of the current epoch's order consumed so far."""
    order_key: dict = field(default_factory=dict)
    """What the current epoch's order was derived from (seed, fingerprint, batch definition)."""
    samples_seen: int = 0
    tokens_seen: int = 0
    steps: list[tuple[int, int, int, int, int]] = field(default_factory=list)
    """Steps recorded since the last write to the store (all of them for an inline ledger)."""
    epoch_ids: dict[int, list[np.ndarray]] = field(default_factory=dict)
    """Ids consumed since the last write to the store, per epoch."""
    fingerprints: dict[int, str] = field(default_factory=dict)
    epoch_counts: dict[int, int] = field(default_factory=dict)
    """Samples consumed per epoch, in the store and in memory together."""
    segments: list[dict] = field(default_factory=list)
    """The store's segments this ledger consists of: kind ('ids' or 'steps'), name, epoch, start, end,
    size, xxh3_64."""
    store: Path | None = None

    def record_step(self, global_step: int, epoch: int, start: int, end: int, ids: np.ndarray, tokens: int) -> None:
        """One optimizer step consumed positions [start, end) of epoch `epoch`'s order, i.e. `ids`."""
        assert epoch == self.epoch and start == self.cursor, "steps must be recorded in stream order"
        self.steps.append((global_step, epoch, start, end, tokens))
        self.epoch_ids.setdefault(epoch, []).append(np.asarray(ids, dtype=np.int64))
        self.epoch_counts[epoch] = self.epoch_counts.get(epoch, 0) + len(ids)
        self.cursor = end
        self.samples_seen += len(ids)
        self.tokens_seen += int(tokens)

    def start_epoch(self, epoch: int, order_key: dict, fingerprint: str) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0
        self.order_key = dict(order_key)
        self.fingerprints[epoch] = fingerprint

    def epochs(self) -> list[int]:
        """The epochs that consumed samples."""
        return sorted(e for e, n in self.epoch_counts.items() if n)

    def consumed_ids(self, epoch: int, limit: int | None = None) -> np.ndarray:
        """The ids consumed in `epoch`, in consumption order (the first `limit` of them: only the
        segments that hold those are read)."""
        limit = self.epoch_counts.get(epoch, 0) if limit is None else limit
        parts, held = [], 0
        for segment in self.segments:
            if held >= limit:
                break
            if segment["kind"] == "ids" and segment["epoch"] == epoch:
                parts.append(self._read(segment))
                held += len(parts[-1])
        parts += self.epoch_ids.get(epoch, [])
        ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
        return ids[:limit]

    def all_steps(self) -> list[tuple[int, int, int, int, int]]:
        """Every recorded step (global_step, epoch, start, end, tokens), the store's and the pending."""
        stored = [tuple(row) for segment in self.segments if segment["kind"] == "steps" for row in self._read(segment).tolist()]
        return stored + list(self.steps)

    def step_ids(self, global_step: int) -> np.ndarray:
        """The sample ids optimizer step `global_step` trained on (an epoch's positions start at 0)."""
        for step, epoch, start, end, _ in self.all_steps():
            if step == global_step:
                return self.consumed_ids(epoch, end)[start:end]
        raise KeyError(f"step {global_step} is not in the ledger")

    def summary(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "steps": len(self.steps) + sum(s["end"] - s["start"] for s in self.segments if s["kind"] == "steps"),
        }

    # ------------------------------------------------------------------ persistence

    def state_dict(self, store: Path | None = None, write: bool = True) -> dict:
        """The ledger for a checkpoint. With `store` (the segment store): what was consumed since the
        last call is written there as one ids segment per epoch and one steps segment (`write` False:
        only recorded, as ranks that do not write checkpoints do), and the state lists the segments.
        Without: inline, every id in the state (JSON values and numpy arrays, `lucatrain.state`)."""
        if store is None:
            return {
                "version": LEDGER_VERSION, **self.summary(), "order_key": self.order_key,
                "steps_table": np.array(self.all_steps(), dtype=np.int64).reshape(-1, 5),
                "epochs": {str(e): {"ids": self.consumed_ids(e), "fingerprint": self.fingerprints.get(e, "")} for e in self.epochs()},
            }  # fmt: skip
        store = Path(store)
        if write and self.store is not None and self.store.resolve() != store.resolve():
            self._adopt_segments(store)
        self.store = store
        self._flush(write)
        return {
            "version": LEDGER_VERSION, **self.summary(), "order_key": self.order_key,
            "epoch_counts": {str(e): n for e, n in sorted(self.epoch_counts.items())},
            "fingerprints": {str(e): f for e, f in sorted(self.fingerprints.items())},
            "segments": [dict(s) for s in self.segments],
        }  # fmt: skip

    def _adopt_segments(self, store: Path) -> None:
        """Bring the segments of the store this ledger was loaded from into `store`: a run resumed from a
        checkpoint in another directory must write checkpoints that stand on their own (each lists every
        segment, and a resume looks for them beside it). Hard links where the file system allows (free),
        else copies."""
        import shutil

        store.mkdir(parents=True, exist_ok=True)
        for segment in self.segments:
            source, target = self.store / segment["name"], store / segment["name"]
            if target.exists() and target.stat().st_size == segment["size"]:
                continue
            if not source.exists():
                raise ValueError(f"{source}: a progress ledger segment of the checkpoint this run resumed from is missing; "
                                 "its consumed ids cannot be carried into this run's checkpoints")  # fmt: skip
            tmp = store / f".{segment['name']}.tmp"
            tmp.unlink(missing_ok=True)
            try:
                os.link(source, tmp)
            except OSError:  # another file system, or links not allowed
                shutil.copyfile(source, tmp)
            os.replace(tmp, target)

    def _flush(self, write: bool) -> None:
        if self.steps:
            table = np.array(self.steps, dtype=np.int64).reshape(-1, 5)
            for epoch in sorted(self.epoch_ids):
                ids = np.concatenate(self.epoch_ids[epoch])
                rows = table[table[:, 1] == epoch]
                first, last = int(rows[0, 2]), int(rows[-1, 3])
                self.segments.append(self._segment("ids", f"e{epoch}-{first:012d}-{last:012d}", ids, epoch, first, last, write))
            steps_name = f"steps-{int(table[0, 0]):010d}-{int(table[-1, 0]):010d}"
            # A steps segment's start/end count its steps (summary's total), not positions.
            self.segments.append(self._segment("steps", steps_name, table, -1, 0, len(table), write))
        self.steps, self.epoch_ids = [], {}

    def _segment(self, kind: str, stem: str, array: np.ndarray, epoch: int, start: int, end: int, write: bool) -> dict:
        import hashlib
        import io

        buffer = io.BytesIO()
        np.save(buffer, array, allow_pickle=False)
        data = buffer.getvalue()
        # The content's hash in the name: a segment rewritten after a resume from an older checkpoint
        # replaces an orphan of the same samples, never one of other samples.
        name = f"{stem}-{hashlib.blake2b(data, digest_size=6).hexdigest()}.npy"
        if write:
            import xxhash

            self.store.mkdir(parents=True, exist_ok=True)
            tmp = self.store / f".{name}.tmp"
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.store / name)
            checksum = xxhash.xxh3_64_hexdigest(data)
        else:
            checksum = None
        return {"kind": kind, "name": name, "epoch": epoch, "start": start, "end": end, "size": len(data), "xxh3_64": checksum}

    def _read(self, segment: dict) -> np.ndarray:
        if self.store is None:
            raise ValueError(f"ledger segment {segment['name']}: no segment store is known for this ledger")
        path = self.store / segment["name"]
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ValueError(f"{path}: progress ledger segment unreadable: {err}") from None
        if len(data) != segment["size"] or (segment.get("xxh3_64") and _xxh3(data) != segment["xxh3_64"]):
            raise ValueError(f"{path}: progress ledger segment does not match its checksum or size (corrupted on disk?)")
        import io

        return np.load(io.BytesIO(data), allow_pickle=False)

    @classmethod
    def from_state_dict(cls, state: dict, where: str = "ledger", store: Path | None = None) -> "Ledger":
        if state.get("version") != LEDGER_VERSION:
            raise ValueError(f"{where}: ledger version {state.get('version')} is not {LEDGER_VERSION}")
        try:
            ledger = cls(epoch=state["epoch"], cursor=state["cursor"], order_key=state["order_key"],
                         samples_seen=state["samples_seen"], tokens_seen=state["tokens_seen"])  # fmt: skip
            if "segments" in state:  # segments in the store: nothing is read now
                ledger.store = Path(store) if store is not None else None
                ledger.segments = [dict(s) for s in state["segments"]]
                ledger.epoch_counts = {int(e): int(n) for e, n in state["epoch_counts"].items()}
                ledger.fingerprints = {int(e): f for e, f in state["fingerprints"].items()}
                for epoch, count in ledger.epoch_counts.items():
                    held = sum(s["end"] - s["start"] for s in ledger.segments if s["kind"] == "ids" and s["epoch"] == epoch)
                    if held != count:
                        raise ValueError(f"{where}: in epoch {epoch} the ledger counts {count} samples but its segments hold {held}")
                return ledger
            ledger.steps = [tuple(row) for row in np.asarray(state["steps_table"]).tolist()]
            for epoch, info in state["epochs"].items():
                ledger.epoch_ids[int(epoch)] = [np.asarray(info["ids"], dtype=np.int64)]
                ledger.epoch_counts[int(epoch)] = len(ledger.epoch_ids[int(epoch)][0])
                ledger.fingerprints[int(epoch)] = info["fingerprint"]
        except (KeyError, TypeError) as err:
            raise ValueError(f"{where}: malformed progress ledger ({err!r})") from None
        for epoch in sorted(set(ledger.epoch_ids) | {step[1] for step in ledger.steps}):
            consumed = sum(end - start for _, e, start, end, _ in ledger.steps if e == epoch)
            held = len(ledger.consumed_ids(epoch))
            if consumed != held:
                raise ValueError(f"{where}: in epoch {epoch} the ledger's steps consumed {consumed} samples but it holds {held} ids")
        return ledger

    @classmethod
    def from_checkpoint(cls, checkpoint_dir: Path) -> "Ledger":
        """The ledger of a committed checkpoint directory (any layout, see `checkpoint.read_checkpoint_state`)."""
        from lucatrain.checkpoint import read_checkpoint_state

        checkpoint_dir = Path(checkpoint_dir)
        return cls.from_state_dict(read_checkpoint_state(checkpoint_dir)["ledger"], str(checkpoint_dir), checkpoint_dir.parent / STORE)


def referenced_segments(state: dict) -> set[str]:
    """The segment names a checkpoint's ledger state lists (none for an inline ledger)."""
    return {s["name"] for s in state.get("segments", [])}


def _xxh3(data: bytes) -> str:
    import xxhash

    return xxhash.xxh3_64_hexdigest(data)


def legacy_ledger_state(directory: Path) -> dict:
    """The `state_dict` of a ledger saved before lucatrain.state (`<checkpoint>/ledger/`: ledger.json,
    steps.npy, ids_epoch<E>.npy), so checkpoints of earlier runs still resume and audit."""
    try:
        meta = json.loads((directory / "ledger.json").read_text())
        epochs = {e: {"ids": np.load(directory / f"ids_epoch{e}.npy", allow_pickle=False), "fingerprint": info["fingerprint"]}
                  for e, info in meta["epochs"].items()}  # fmt: skip
        steps = np.load(directory / "steps.npy", allow_pickle=False)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{directory}: unreadable progress ledger: {err}") from None
    keys = ("version", "epoch", "cursor", "order_key", "samples_seen", "tokens_seen")
    return {**{k: meta.get(k) for k in keys}, "steps_table": steps, "epochs": epochs}


def audit(ledger: Ledger, all_ids: np.ndarray | None = None) -> dict:
    """Per epoch: samples consumed, ids consumed twice, and (given the dataset's ids) ids never seen."""
    # One sort per epoch and lookups in it: np.unique and np.setdiff1d take seconds each at 10 M ids.
    distinct_all = _distinct(np.sort(np.asarray(all_ids, dtype=np.int64))) if all_ids is not None else None
    report = {}
    for epoch in ledger.epochs():
        ordered = np.sort(ledger.consumed_ids(epoch))
        unique = _distinct(ordered)
        repeated = _distinct(ordered[1:][ordered[1:] == ordered[:-1]])  # ids consumed more than once
        entry = {"consumed": int(len(ordered)), "unique": int(len(unique)), "duplicates": repeated[:100].tolist(),
                 "num_duplicates": int(len(repeated))}  # fmt: skip
        if distinct_all is not None:
            entry["never_seen"] = int(len(distinct_all) - _contained(distinct_all, unique).sum())
        report[epoch] = entry
    return report


def _distinct(ordered: np.ndarray) -> np.ndarray:
    """The distinct values of a sorted array."""
    if ordered.size == 0:
        return ordered
    return ordered[np.concatenate(([True], ordered[1:] != ordered[:-1]))]


def _contained(values: np.ndarray, ordered: np.ndarray) -> np.ndarray:
    """(len(values),) bool: each value is in the sorted array `ordered`."""
    if ordered.size == 0:
        return np.zeros(values.size, dtype=bool)
    position = np.minimum(np.searchsorted(ordered, values), ordered.size - 1)
    return ordered[position] == values
