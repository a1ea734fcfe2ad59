"""Task labels: checking them once at prepare time, reading label files, encoding them per batch.

Checking happens when a record is read (`check_labels`), so a malformed span or an out-of-range
residue position stops `prepare` naming the file and line, before any compute is spent. What can
only be checked against the run's label files (an index past the end of `label/<task>.txt`) is
checked at start-up from the per-task maxima that prepare stores in meta.json (`LabelStats`).

Encoding (`encode_labels`) turns one micro-batch's label dicts into tensors aligned with the
collated tokens ([CLS] at position 0, residue r at position r + 1 - cut, where `cut` residues
were removed from the left by truncation):

    span task      (B, W) int64     class index on tokens inside a span, IGNORE_INDEX elsewhere
    seq multi-class (B,) int64       class index, IGNORE_INDEX for a record without the label
    prot_keyword   (B, C) float32   1.0 listed, 0.0 not listed; rows without the label all -100
    prot_structure (B, W, 3) float32 coordinates scaled per protein (`min_max_scaled`), NaN where
                   a residue has none
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lucatrain.data.alphabet import IGNORE_INDEX
from lucatrain.families.lucaone.specs import LEVELS, MULTI_CLASS, MULTI_LABEL, REGRESSION, TASKS

LABEL_HEADER = "label"


# --------------------------------------------------------------------------------------------
# Checking a record's labels (prepare time)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def task_labels(labels: dict):
    """Yield (level, task name, value) for every non-null entry of a label dict.

    A top-level key that is not a task level yields (key, "", value): it is counted, not checked.
    """
    for level, tasks in labels.items():
        if level not in LEVELS:
            yield level, "", tasks
            continue
        if not isinstance(tasks, dict):
            raise ValueError(f"obj_label[{level!r}] must be an object of task -> label, got {type(tasks).__name__}")
        for name, value in tasks.items():
            if value is not None:
                yield level, name, value


def check_labels(labels: dict, obj_type: int, seq_len: int) -> dict[str, tuple[int, bool]]:
    """Validate a record's label dict against the task table.

    Returns {task: (largest label index, whether the label is a list of indices)}. Raises ValueError
    saying which task and which entry is wrong. Entries of tasks not in the table are not checked and
    are returned as (-1, False) (prepare counts them, the trainer names them). A sequence-level class
    label may be one index or a list of them: which one a task needs depends on its output mode, a
    run setting, checked at start-up against the counts prepare stores.
    """
    found: dict[str, tuple[int, bool]] = {}
    for level, name, value in task_labels(labels):
        spec = TASKS.get(name)
        if spec is None or spec.level != level:
            found[f"{level}.{name}" if name else level] = (-1, False)
            continue
        where = f"{level}.{name}"
        if spec.obj_type != obj_type:
            kinds = {0: "gene", 1: "prot"}
            raise ValueError(f"{where} is a {kinds[spec.obj_type]} task but the record is {kinds[obj_type]}")
        if spec.level == "span_level":
            found[name] = (_check_spans(where, value, seq_len), False)
        elif spec.output_mode == REGRESSION:
            _check_coordinates(where, value, seq_len)
            found[name] = (-1, False)
        elif _is_int(value) and value >= 0:
            found[name] = (value, False)
        elif isinstance(value, list) and all(_is_int(v) and v >= 0 for v in value):
            found[name] = (max(value, default=-1), True)
        else:
            raise ValueError(f"{where} must be a label index (int >= 0) or a list of them, got {_short(value)}")
    return found


def _check_spans(where: str, spans, seq_len: int) -> int:
    if not isinstance(spans, list):
        raise ValueError(f"{where} must be a list of [start, end, label_index], got {_short(spans)}")
    largest = -1
    for k, span in enumerate(spans):
        if not (isinstance(span, list) and len(span) == 3 and all(_is_int(v) for v in span)):
            raise ValueError(f"{where}[{k}] must be [start, end, label_index] (3 ints), got {_short(span)}")
        start, end, index = span
        if not 0 <= start <= end < seq_len:
            raise ValueError(
                f"{where}[{k}] = {span}: need 0 <= start <= end < {seq_len} (the sequence length; "
                "positions are 0-based and inclusive)"
            )
        if index < 0:
            raise ValueError(f"{where}[{k}] = {span}: label index must be >= 0")
        largest = max(largest, index)
    return largest


def _check_coordinates(where: str, coords, seq_len: int) -> None:
    if not isinstance(coords, list) or len(coords) != seq_len:
        got = f"{len(coords)} entries" if isinstance(coords, list) else type(coords).__name__
        raise ValueError(f"{where} must have one [x, y, z] (or null) per residue: {seq_len} expected, got {got}")
    for k, xyz in enumerate(coords):
        if xyz is None or xyz == -1:
            continue
        if not (isinstance(xyz, list) and len(xyz) == 3 and all(map(_is_number, xyz))):
            raise ValueError(f"{where}[{k}] must be [x, y, z] (finite numbers), null or -1, got {_short(xyz)}")


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class LabelStats:
    """Per task: how many records carry it, how many of those as a list of indices, and the largest
    label index seen (meta.json `labels`)."""

    def __init__(self, stats: dict | None = None):
        self.stats: dict[str, dict[str, int]] = {k: dict(v) for k, v in (stats or {}).items()}

    def merge(self, other: "LabelStats") -> None:
        """Add another dataset's statistics (e.g. every dev split's, checked together)."""
        for name, entry in other.stats.items():
            own = self.stats.setdefault(name, {"records": 0, "lists": 0, "max_index": -1})
            own["records"] += entry["records"]
            own["lists"] += entry["lists"]
            own["max_index"] = max(own["max_index"], entry["max_index"])

    def add(self, found: dict[str, tuple[int, bool]]) -> None:
        for name, (largest, is_list) in found.items():
            entry = self.stats.setdefault(name, {"records": 0, "lists": 0, "max_index": -1})
            entry["records"] += 1
            entry["lists"] += int(is_list)
            entry["max_index"] = max(entry["max_index"], largest)

    def lists(self, name: str) -> int:
        return self.stats.get(name, {}).get("lists", 0)

    def records(self, name: str) -> int:
        return self.stats.get(name, {}).get("records", 0)

    def max_index(self, name: str) -> int:
        return self.stats.get(name, {}).get("max_index", -1)

    def unknown_keys(self) -> list[str]:
        """Label entries prepare found that are not tasks of the table (typos, other tools' labels)."""
        return sorted(k for k in self.stats if k not in TASKS)

    def to_json(self) -> dict:
        return {k: self.stats[k] for k in sorted(self.stats)}


# --------------------------------------------------------------------------------------------
# Label files


def read_label_file(path) -> list[str]:
    """Label names of a LucaOne label file: a `label` header line, then one name per line.

    Raises ValueError naming the file (and line) when it is missing, lacks the header, or has an
    empty or repeated name: the class indices in the data are line numbers, so these must hold.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"label file {path} does not exist")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # -sig: a spreadsheet's byte-order mark
    if not lines or lines[0].strip().lower() != LABEL_HEADER:
        first = lines[0] if lines else "(empty file)"
        raise ValueError(f"{path}:1: the first line must be the header {LABEL_HEADER!r}, got {first!r}")
    names, seen = [], {}
    for lineno, line in enumerate(lines[1:], 2):
        name = line.strip()
        if not name:
            if all(not rest.strip() for rest in lines[lineno - 1 :]):
                break  # trailing blank lines
            raise ValueError(f"{path}:{lineno}: empty label name (a label's index is its line number)")
        if name in seen:
            raise ValueError(f"{path}:{lineno}: label {name!r} repeats line {seen[name]}")
        seen[name] = lineno
        names.append(name)
    if not names:
        raise ValueError(f"{path} holds no labels after its header")
    return names


# --------------------------------------------------------------------------------------------
# Encoding a micro-batch (collate time)


def encode_labels(label_texts, task_names, num_labels: dict[str, int], n_residues, cuts, width: int,
                  output_modes: dict[str, str] | None = None) -> dict:  # fmt: skip
    """Label arrays for one micro-batch, aligned with the collated tokens (module docstring).

    label_texts: canonical JSON per row; n_residues: residues kept per row; cuts: residues removed
    from the left per row (truncation="left"); output_modes: task -> mode where it differs from the
    table (a multi-label task takes a single index as a one-item list). Spans falling outside the
    kept residues are clipped or dropped. Returns {f"{task}_labels": numpy array}.
    """
    batch = len(label_texts)
    parsed = [json.loads(text) if text and text != "{}" else {} for text in label_texts]
    out = {}
    for name in task_names:
        spec = TASKS[name]
        mode = (output_modes or {}).get(name, spec.output_mode)
        key = f"{name}_labels"
        if spec.level == "span_level":
            arr = np.full((batch, width), IGNORE_INDEX, dtype=np.int64)
            for i, labels in enumerate(parsed):
                for start, end, index in labels.get("span_level", {}).get(name) or ():
                    lo, hi = max(start - cuts[i], 0), min(end - cuts[i], n_residues[i] - 1)
                    if lo <= hi:
                        arr[i, lo + 1 : hi + 2] = index  # +1: [CLS] is token 0
        elif mode == MULTI_CLASS:
            arr = np.full(batch, IGNORE_INDEX, dtype=np.int64)
            for i, labels in enumerate(parsed):
                value = labels.get(spec.level, {}).get(name)
                if value is not None:
                    arr[i] = value
        elif mode == MULTI_LABEL:
            arr = np.full((batch, num_labels[name]), IGNORE_INDEX, dtype=np.float32)
            for i, labels in enumerate(parsed):
                value = labels.get(spec.level, {}).get(name)
                if value is not None:
                    value = value if isinstance(value, list) else [value]
                    arr[i] = 0.0  # a record with the task: every label it does not list is a negative
                    arr[i, value] = 1.0
        elif mode == REGRESSION:
            arr = np.full((batch, width, 3), np.nan, dtype=np.float32)
            for i, labels in enumerate(parsed):
                coords = labels.get(spec.level, {}).get(name)
                if coords is None:
                    continue
                kept = coords[cuts[i] : cuts[i] + n_residues[i]]
                arr[i, 1 : 1 + len(kept)] = min_max_scaled(kept)
        else:
            continue  # masked-LM labels are made by the collate kernel
        out[key] = arr
    return out


def spans_cut(label_texts, lengths, max_length: int, truncation: str, task_names) -> dict[str, tuple[int, int]]:
    """Per span task: (spans dropped, spans clipped) by truncating records of `lengths` residues to
    `max_length` tokens, with the arithmetic of `encode_labels`. Pass only the records that are cut."""
    counts = {name: [0, 0] for name in task_names if TASKS[name].level == "span_level"}
    keep = max_length - 2
    for text, length in zip(label_texts, lengths):
        if not text or text == "{}":
            continue
        spans = json.loads(text).get("span_level", {})
        n = min(int(length), keep)
        cut = int(length) - n if truncation == "left" else 0
        for name, found in counts.items():
            for start, end, _ in spans.get(name) or ():
                lo, hi = max(start - cut, 0), min(end - cut, n - 1)
                if lo > hi:
                    found[0] += 1
                elif (lo, hi) != (start - cut, end - cut):
                    found[1] += 1
    return {name: (dropped, clipped) for name, (dropped, clipped) in counts.items() if dropped or clipped}


@dataclass(frozen=True)
class TaskLabelEncoder:
    """The Collator's label hook for a run's LucaOne tasks (a picklable object, not a closure, so
    DataLoader workers started by spawn can receive it)."""

    task_names: tuple[str, ...]
    num_labels: dict
    output_modes: dict

    def __call__(self, rows: dict, n_residues, cuts, width: int) -> dict:
        return encode_labels(rows["labels"], self.task_names, self.num_labels, n_residues, cuts, width, self.output_modes)


def min_max_scaled(coords: list) -> np.ndarray:
    """(n, 3) float32: each axis of one protein's coordinates min-max scaled to [0, 1], as LucaOne does.

    The range is taken over the residues that have coordinates among those kept after truncation;
    an axis with a single value becomes 1.0 (LucaOne's convention). Missing residues are NaN.
    """
    values = np.array([xyz if isinstance(xyz, list) else (np.nan,) * 3 for xyz in coords], dtype=np.float64)
    values = values.reshape(-1, 3)
    present = ~np.isnan(values[:, 0])
    if not present.any():
        return values.astype(np.float32)
    low, high = values[present].min(axis=0), values[present].max(axis=0)
    span = high - low
    flat = span == 0
    scaled = (values - low) / np.where(flat, 1.0, span)
    for axis in np.flatnonzero(flat):
        scaled[present, axis] = 1.0
    return scaled.astype(np.float32)
