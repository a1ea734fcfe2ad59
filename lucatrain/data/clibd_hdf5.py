"""CLIBD's HDF5 layout (BIOSCAN-1M/5M), read lazily: one file handle per process, opened on first use.

A file holds one group per split (`no_split_and_seen_train`, `val_seen`, `val_unseen`, `test_seen`,
`test_unseen`, `seen_keys`, `unseen_keys`, `all_keys`, `other_heldout`, ...; docs/clibd_reference.md).
In each group, one row per specimen:

    image         uint8 (N, MAX_LEN)   JPEG bytes, zero-padded
    image_mask    int64 (N,)           the JPEG's byte length
    barcode       bytes (N,)           the DNA barcode
    processid, sampleid               bytes (N,)           specimen ids (BIOSCAN-1M may lack processid)
    order, family, genus, species     strings (N,)         missing ranks are "not_classified"

`ClibdHdf5` pickles as its path, so DataLoader workers (fork or spawn) each open their own handle;
h5py handles must not cross processes. `specimen(group, i)` reads one row; `check(group, i)`
says what makes a row unusable (file, group and index named), for the `data.bad_records` policy.
`write_clibd_hdf5` writes the same layout (the shipped sample, tests).
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from lucatrain.data.sources import RecordError

RANKS = ("order", "family", "genus", "species")
NOT_CLASSIFIED = "not_classified"
ID_FIELDS = ("processid", "sampleid")
_REQUIRED = ("image", "image_mask", "barcode", "sampleid", *RANKS)


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


class ClibdHdf5:
    """A CLIBD-layout HDF5 file; every process opens its own read-only handle on first access."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise RecordError(self.path, None, "no such file")
        self._file = None
        self._pid = None

    def __reduce__(self):
        return (ClibdHdf5, (str(self.path),))

    @property
    def file(self):
        if self._file is None or self._pid != os.getpid():  # a forked worker must not reuse the parent's handle
            import h5py

            try:
                self._file = h5py.File(self.path, "r")
            except OSError as err:
                raise RecordError(self.path, None, f"not a readable HDF5 file: {err}") from None
            self._pid = os.getpid()
        return self._file

    def groups(self) -> list[str]:
        return sorted(self.file.keys())

    def group(self, name: str):
        if name not in self.file:
            raise RecordError(self.path, None, f"has no group {name!r}; its groups are {self.groups()}")
        group = self.file[name]
        missing = [field for field in _REQUIRED if field not in group]
        if missing:
            raise RecordError(self.path, None, f"group {name!r} lacks {missing} (CLIBD's layout; it has {sorted(group.keys())})")
        return group

    def num_specimens(self, name: str) -> int:
        return int(self.group(name)["image_mask"].shape[0])

    def specimen(self, name: str, index: int) -> dict:
        """One row: ids, barcode, taxonomy (rank -> name) and the JPEG bytes (undecoded)."""
        group = self.group(name)
        length = int(group["image_mask"][index])
        row = {
            "processid": _text(group["processid"][index]) if "processid" in group else "",
            "sampleid": _text(group["sampleid"][index]),
            "barcode": _text(group["barcode"][index]).strip(),
            "taxonomy": {rank: _text(group[rank][index]) for rank in RANKS},
            "image": bytes(group["image"][index, :length]) if length > 0 else b"",
        }
        return row

    def specimen_id(self, row: dict) -> str:
        """processid where the file has one (BIOSCAN-5M), else sampleid: what the sample id hashes."""
        return row["processid"] or row["sampleid"]

    def check(self, name: str, index: int, row: dict) -> RecordError | None:
        """Why `row` cannot train, naming file, group and index; None when it can."""
        where = f"group {name!r} index {index}"
        if not self.specimen_id(row):
            return RecordError(self.path, None, f"{where}: no processid or sampleid")
        if not row["barcode"]:
            return RecordError(self.path, None, f"{where} ({self.specimen_id(row)}): empty barcode")
        if not row["image"]:
            return RecordError(self.path, None, f"{where} ({self.specimen_id(row)}): no image bytes (image_mask is 0)")
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(row["image"])) as image:
                image.verify()
        except (UnidentifiedImageError, OSError, SyntaxError) as err:  # PIL's verify() signals damage with these
            return RecordError(self.path, None, f"{where} ({self.specimen_id(row)}): the image does not decode: {err}")
        empty = [rank for rank in RANKS if not row["taxonomy"][rank].strip()]
        if empty:
            return RecordError(self.path, None, f"{where} ({self.specimen_id(row)}): empty taxonomy {empty} "
                                                f"(CLIBD writes {NOT_CLASSIFIED!r} for an unknown rank)")  # fmt: skip
        return None

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def write_clibd_hdf5(path, groups: dict[str, list[dict]]) -> Path:
    """Write `groups` ({name: [specimen dicts as `ClibdHdf5.specimen` returns them]}) in CLIBD's layout."""
    import h5py

    path = Path(path)
    with h5py.File(path, "w") as f:
        for name, rows in groups.items():
            group = f.create_group(name)
            width = max([len(r["image"]) for r in rows] + [1])
            images = np.zeros((len(rows), width), dtype=np.uint8)
            for i, row in enumerate(rows):
                images[i, : len(row["image"])] = np.frombuffer(row["image"], dtype=np.uint8)
            group.create_dataset("image", data=images)
            group.create_dataset("image_mask", data=np.array([len(r["image"]) for r in rows], dtype=np.int64))
            for field in ("barcode", *ID_FIELDS):
                group.create_dataset(field, data=np.array([r[field].encode() for r in rows], dtype="S"))
            text = h5py.string_dtype("utf-8")
            for rank in RANKS:
                group.create_dataset(rank, data=[r["taxonomy"][rank] for r in rows], dtype=text)
            group.create_dataset("image_file", data=np.array([f"{r['processid']}.1024px.jpg".encode() for r in rows], dtype="S"))
    return path
