"""The progress ledger: which sample ids each optimizer step consumed, and where the stream stands.

Stored in every checkpoint as plain JSON + numpy arrays (no pickle), under `ledger` in the
checkpoint's state (`<checkpoint>/state/`, see `lucatrain.state`):

    epoch, cursor, order_key, counters   in state.json: the identity of the epoch's order and totals
    ledger.steps_table.npy    int64 (S, 5): global_step, epoch, start, end, tokens — optimizer step
                              `global_step` consumed positions [start, end) of epoch `epoch`'s order
    ledger.epochs.<E>.ids.npy int64: the sample ids consumed in epoch E, in consumption order

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

    def state_dict(self) -> dict:
        """JSON values and numpy arrays (`lucatrain.state`): steps (S, 5) and the ids of each epoch."""
        return {
            "version": LEDGER_VERSION,
            **self.summary(),
            "order_key": self.order_key,
            "steps_table": np.array(self.steps, dtype=np.int64).reshape(-1, 5),
            "epochs": {
                str(e): {"ids": self.consumed_ids(e), "fingerprint": self.fingerprints.get(e, "")}
                for e in sorted(self.epoch_ids)
            },
        }

    @classmethod
    def from_state_dict(cls, state: dict, where: str = "ledger") -> "Ledger":
        if state.get("version") != LEDGER_VERSION:
            raise ValueError(f"{where}: ledger version {state.get('version')} is not {LEDGER_VERSION}")
        try:
            ledger = cls(epoch=state["epoch"], cursor=state["cursor"], order_key=state["order_key"],
                         samples_seen=state["samples_seen"], tokens_seen=state["tokens_seen"])  # fmt: skip
            ledger.steps = [tuple(row) for row in np.asarray(state["steps_table"]).tolist()]
            for epoch, info in state["epochs"].items():
                ledger.epoch_ids[int(epoch)] = [np.asarray(info["ids"], dtype=np.int64)]
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
        """The ledger of a committed checkpoint directory (either layout, see `checkpoint.read_checkpoint_state`)."""
        from lucatrain.checkpoint import read_checkpoint_state

        return cls.from_state_dict(read_checkpoint_state(Path(checkpoint_dir))["ledger"], str(checkpoint_dir))


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
