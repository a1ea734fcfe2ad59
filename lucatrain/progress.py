"""The progress ledger: which sample ids each optimizer step consumed, and where the stream stands.

Stored in every checkpoint as plain JSON + numpy arrays (no pickle), in `<checkpoint>/ledger/`:

    ledger.json        epoch, cursor, the identity of the epoch's order (`order_key`), counters,
                       and a summary per epoch (samples consumed, dataset fingerprint)
    steps.npy          int64 (S, 5): global_step, epoch, start, end, tokens — optimizer step
                       `global_step` consumed positions [start, end) of epoch `epoch`'s order
    ids_epoch<E>.npy   int64: the sample ids consumed in epoch E, in consumption order

The cursor counts samples of the current epoch's order already trained on. Resuming with the same
order continues at the cursor; with a different one (data changed, or a token-budget plan cut for
another world size) the consumed ids are excluded from a new plan of the epoch, by id only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

LEDGER_VERSION = 1


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
    epoch_ids: dict[int, list[np.ndarray]] = field(default_factory=dict)
    fingerprints: dict[int, str] = field(default_factory=dict)

    def record_step(self, global_step: int, epoch: int, start: int, end: int, ids: np.ndarray, tokens: int) -> None:
        """One optimizer step consumed positions [start, end) of epoch `epoch`'s order, i.e. `ids`."""
        assert epoch == self.epoch and start == self.cursor, "steps must be recorded in stream order"
        self.steps.append((global_step, epoch, start, end, tokens))
        self.epoch_ids.setdefault(epoch, []).append(np.asarray(ids, dtype=np.int64))
        self.cursor = end
        self.samples_seen += len(ids)
        self.tokens_seen += int(tokens)

    def start_epoch(self, epoch: int, order_key: dict, fingerprint: str) -> None:
        if epoch != self.epoch:
            self.epoch, self.cursor = epoch, 0
        self.order_key = dict(order_key)
        self.fingerprints[epoch] = fingerprint

    def consumed_ids(self, epoch: int) -> np.ndarray:
        parts = self.epoch_ids.get(epoch, [])
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def step_ids(self, global_step: int) -> np.ndarray:
        """The sample ids optimizer step `global_step` trained on."""
        offset = {}
        for step, epoch, start, end, _ in self.steps:
            if step == global_step:
                base = offset.get(epoch, 0)
                return self.consumed_ids(epoch)[base : base + end - start]
            offset[epoch] = offset.get(epoch, 0) + end - start
        raise KeyError(f"step {global_step} is not in the ledger")

    def summary(self) -> dict:
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "samples_seen": self.samples_seen,
            "tokens_seen": self.tokens_seen,
            "steps": len(self.steps),
        }

    # ------------------------------------------------------------------ persistence

    def save(self, directory: Path) -> list[Path]:
        directory.mkdir(parents=True, exist_ok=True)
        written = []
        meta = {
            "version": LEDGER_VERSION,
            **self.summary(),
            "order_key": self.order_key,
            "epochs": {
                str(e): {"samples": int(sum(len(a) for a in parts)), "fingerprint": self.fingerprints.get(e, "")}
                for e, parts in sorted(self.epoch_ids.items())
            },
        }
        steps = np.array(self.steps, dtype=np.int64).reshape(-1, 5)
        np.save(directory / "steps.npy", steps, allow_pickle=False)
        written.append(directory / "steps.npy")
        for epoch in self.epoch_ids:
            path = directory / f"ids_epoch{epoch}.npy"
            np.save(path, self.consumed_ids(epoch), allow_pickle=False)
            written.append(path)
        (directory / "ledger.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        written.append(directory / "ledger.json")
        return written

    @classmethod
    def load(cls, directory: Path) -> "Ledger":
        path = directory / "ledger.json"
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise ValueError(f"{path}: unreadable progress ledger: {err}") from None
        if meta.get("version") != LEDGER_VERSION:
            raise ValueError(f"{path}: ledger version {meta.get('version')} is not {LEDGER_VERSION}")
        ledger = cls(
            epoch=meta["epoch"],
            cursor=meta["cursor"],
            order_key=meta["order_key"],
            samples_seen=meta["samples_seen"],
            tokens_seen=meta["tokens_seen"],
        )
        steps = np.load(directory / "steps.npy", allow_pickle=False)
        ledger.steps = [tuple(row) for row in steps.tolist()]
        for epoch, info in meta["epochs"].items():
            ids = np.load(directory / f"ids_epoch{epoch}.npy", allow_pickle=False)
            if len(ids) != info["samples"]:
                raise ValueError(f"{directory}/ids_epoch{epoch}.npy holds {len(ids)} ids, ledger.json says {info['samples']}")
            ledger.epoch_ids[int(epoch)] = [ids]
            ledger.fingerprints[int(epoch)] = info["fingerprint"]
        return ledger


def audit(ledger: Ledger, all_ids: np.ndarray | None = None) -> dict:
    """Per epoch: samples consumed, ids consumed twice, and (given the dataset's ids) ids never seen."""
    report = {}
    for epoch in sorted(ledger.epoch_ids):
        ids = ledger.consumed_ids(epoch)
        unique, counts = np.unique(ids, return_counts=True)
        entry = {"consumed": int(len(ids)), "unique": int(len(unique)), "duplicates": unique[counts > 1].tolist()[:100],
                 "num_duplicates": int((counts > 1).sum())}
        if all_ids is not None:
            entry["never_seen"] = int(len(np.setdiff1d(all_ids, unique)))
        report[epoch] = entry
    return report
