"""The one path for state that survives a restart: nested dicts of JSON values and numpy arrays.

Everything with `state_dict()` (trainer counters, the progress ledger, the Task's and callbacks'
run state, the family's resume record) goes into one nested dict, written by `write_state` as

    <dir>/state.json          the dict, each array replaced by {"__array__": "array-<n>.npy"}
    <dir>/array-<n>.npy       each array, saved with allow_pickle=False (numbered in the order the
                              dict is walked: keys may hold any characters, '/' and '.' included)

and read back by `read_state`. No pickle anywhere: a checkpoint can be inspected with `cat` and
loaded without trusting its author.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

STATE_FILE = "state.json"
_ARRAY = "__array__"


def write_state(directory: Path, state: dict) -> None:
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    written: list[str] = []

    def encode(node, path: list[str]):
        if isinstance(node, np.ndarray):
            name = f"array-{len(written):04d}.npy"
            np.save(directory / name, node, allow_pickle=False)
            written.append(name)
            return {_ARRAY: name}
        if isinstance(node, dict):
            for key in node:
                if not isinstance(key, str):
                    raise TypeError(f"state key {key!r} at {'.'.join(path) or '(top)'} must be a string")
            return {key: encode(value, [*path, key]) for key, value in node.items()}
        if isinstance(node, (list, tuple)):
            return [encode(value, [*path, str(i)]) for i, value in enumerate(node)]
        if isinstance(node, (np.integer, np.floating)):
            return node.item()
        return node

    encoded = encode(state, [])
    (directory / STATE_FILE).write_text(json.dumps(encoded, indent=1, sort_keys=True))


def read_state(directory: Path) -> dict:
    """The dict `write_state` wrote; ValueError naming the file when it is missing or broken."""
    directory = Path(directory)
    path = directory / STATE_FILE
    try:
        encoded = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: unreadable checkpoint state: {err}") from None

    def decode(node):
        if isinstance(node, dict):
            if set(node) == {_ARRAY}:
                try:
                    return np.load(directory / node[_ARRAY], allow_pickle=False)
                except (OSError, ValueError) as err:
                    raise ValueError(f"{directory / node[_ARRAY]}: unreadable array: {err}") from None
            return {key: decode(value) for key, value in node.items()}
        if isinstance(node, list):
            return [decode(value) for value in node]
        return node

    return decode(encoded)
