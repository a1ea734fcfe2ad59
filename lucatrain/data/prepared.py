"""The prepared dataset: input files validated once and stored as one memory-mapped Arrow file.

`prepare` reads every input record (see `sources`), turns it into a row with the model family's
recipe (`schema.PrepareRecipe`), applies the bad-record policy, gives each record a stable 63-bit
`sample_id`, and writes

    out_dir/data.arrow      Arrow IPC stream: sample_id, the recipe's columns (the base and LucaOne
                            recipes: obj_id, obj_type, seq, labels), modality masks, length
    out_dir/meta.json       version, fingerprint, recipe and its schema, counts per file and per
                            type, options, the recipe's statistics, time
    out_dir/rejects.jsonl   only with bad_records="skip": one {"path","line","reason"} per line

Records are streamed in batches, so preparing millions of records never holds them all as
Python objects. The output appears atomically: it is built in a staging directory beside
`out_dir` and renamed into place at the end, so a failed prepare leaves nothing behind.

A sample_id hashes (file name, record index, obj_id): it does not depend on the directory the
data lives in, nor on which other files are in the inputs, so a resumed run can find the records
it has already seen by id even after the data moves or grows.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from lucatrain.data import alphabet
from lucatrain.data.schema import PrepareRecipe, Schema, SEQUENCE_SCHEMA
from lucatrain.data.sources import (
    formats,
    RecordError,
    detect_format,
    iter_records,
    list_input_files,
)

PREPARED_VERSION = 2  # 2: labels checked by the family's recipe (LucaOne: per-task stats in meta.json)
BAD_RECORD_POLICIES = ("fail", "skip")

DATA_FILE = "data.arrow"
META_FILE = "meta.json"
REJECTS_FILE = "rejects.jsonl"

# A record batch is flushed at this many rows or this many characters/bytes of text and blob columns,
# whichever comes first: the second bound keeps memory flat when sequences are long (whole viral
# genomes) or rows hold images.
_BATCH_ROWS = 10_000
_BATCH_CHARS = 64 * 2**20
_HASH_CHUNK = 2**20  # 1 MiB reads when fingerprinting input files
_ID_MASK = 0x7FFF_FFFF_FFFF_FFFF  # 63 bits: ids stay non-negative as int64

BASE_RECIPE = PrepareRecipe()


def sample_id_of(file_name: str, index: int, obj_id: str) -> int:
    """Stable 63-bit id of the record `obj_id` at 0-based `index` in a file named `file_name`."""
    digest = hashlib.blake2b(f"{file_name}\x00{index}\x00{obj_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") & _ID_MASK


def _sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    with open(path, "rb") as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def fingerprint_inputs(files: list[Path], options: dict) -> str:
    """sha256 hex over the prepared-format version, `options` and each file's name, size, bytes.

    Only the file *name* enters, not its directory, so moving the data keeps the fingerprint
    (and the cache entry) valid; any change to a file's contents changes it.
    """
    digest = hashlib.sha256()
    digest.update(f"lucatrain-prepared-v{PREPARED_VERSION}\n".encode())
    digest.update(json.dumps(options, sort_keys=True).encode() + b"\n")
    for path in map(Path, files):
        size = path.stat().st_size
        digest.update(f"{path.name}\x00{size}\x00{_sha256_of_file(path)}\n".encode())
    return digest.hexdigest()


def _options(fmt: str = "auto", fasta_obj_type: str = "auto", bad_records: str = "fail") -> dict:
    """The validated prepare options, with defaults filled in (they enter the fingerprint)."""
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
    if fmt != "auto" and fmt not in formats():
        raise ValueError(f"fmt must be 'auto' or one of {list(formats())}, got {fmt!r}")
    if fasta_obj_type not in ("auto", "gene", "prot"):
        raise ValueError(f"fasta_obj_type must be 'auto', 'gene' or 'prot', got {fasta_obj_type!r}")
    return {"fmt": fmt, "fasta_obj_type": fasta_obj_type, "bad_records": bad_records}


# --------------------------------------------------------------------------------------------
# Writing


class _BatchWriter:
    """Buffers records column-wise and writes them to an Arrow IPC stream in record batches.

    Besides the Arrow file it keeps, per row, only the sample id and source line as numpy
    chunks (16 bytes a row), for the duplicate-id check at the end.
    """

    def __init__(self, path: Path, recipe: PrepareRecipe):
        self.recipe = recipe
        self.schema = recipe.schema.arrow()
        self._sink = pa.OSFile(str(path), "wb")
        self._writer = pa.ipc.new_stream(self._sink, self.schema)
        self._columns: dict[str, list] = {name: [] for name in self.schema.names}
        self._chars = 0
        self._ids: list[np.ndarray] = []
        self._lines: list[np.ndarray] = []
        self._line_buffer: list[int] = []
        self.num_rows = 0
        self.residues = 0
        self.type_counts = {alphabet.GENE: 0, alphabet.PROT: 0}

    def add(self, record, sample_id: int) -> None:
        """Append one record; raises ValueError (from the recipe) for a record it cannot use."""
        row = self.recipe.row(record)
        length = self.recipe.length(record)
        wanted = [c.name for c in self.recipe.schema.columns]
        if sorted(row) != sorted(wanted):  # a recipe bug: say so before anything is appended
            raise AssertionError(f"recipe {self.recipe.name} gave columns {sorted(row)}, its schema has {sorted(wanted)}")
        cols = self._columns
        cols["sample_id"].append(sample_id)
        for name, value in row.items():
            cols[name].append(value)
        for modality in self.recipe.schema.modalities:
            cols[f"{modality}_present"].append(row[modality] is not None)
        cols["length"].append(length)
        self._line_buffer.append(record.line)
        # Buffered bytes of text and blob columns (sequences, encoded images) bound a record batch's memory.
        self._chars += sum(len(v) for v in row.values() if isinstance(v, (str, bytes)))
        self.residues += length
        if "obj_type" in row:
            self.type_counts[row["obj_type"]] += 1
        self.num_rows += 1
        if len(cols["sample_id"]) >= _BATCH_ROWS or self._chars >= _BATCH_CHARS:
            self.flush()

    def flush(self) -> None:
        cols = self._columns
        if not cols["sample_id"]:
            return
        batch = pa.record_batch([pa.array(cols[f.name], type=f.type) for f in self.schema], schema=self.schema)
        self._writer.write_batch(batch)
        self._ids.append(np.asarray(cols["sample_id"], dtype=np.int64))
        self._lines.append(np.asarray(self._line_buffer, dtype=np.int64))
        for values in cols.values():
            values.clear()
        self._line_buffer.clear()
        self._chars = 0

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        """Flush, close the file, and return (sample_ids, lines) of all rows written."""
        self.flush()
        self._writer.close()
        self._sink.close()
        empty = np.zeros(0, dtype=np.int64)
        ids = np.concatenate(self._ids) if self._ids else empty
        lines = np.concatenate(self._lines) if self._lines else empty
        return ids, lines


def _write_records(files: list[Path], staging: Path, options: dict, recipe: PrepareRecipe) -> dict:
    """Write every good record of `files` into `staging`; return the counts for meta.json.

    With bad_records="fail" the first RecordError is raised; with "skip" it goes to rejects.jsonl.
    A record the recipe refuses (ValueError) is a bad record like one the reader refused.
    """
    recipe.start()
    writer = _BatchWriter(staging / DATA_FILE, recipe)
    rejects = None
    per_file = []
    file_row_ends = []  # cumulative row count after each file: maps a row back to its file
    try:
        for path in files:
            fmt = detect_format(path) if options["fmt"] == "auto" else options["fmt"]
            good = bad = 0
            for item in iter_records(path, fmt, options["fasta_obj_type"]):
                if not isinstance(item, RecordError):
                    try:
                        writer.add(item, sample_id_of(path.name, item.index, item.obj_id))
                        good += 1
                        continue
                    except ValueError as err:
                        item = RecordError(item.path, item.line, str(err))
                if isinstance(item, RecordError):
                    if options["bad_records"] == "fail":
                        raise item
                    if rejects is None:
                        rejects = open(staging / REJECTS_FILE, "w", encoding="utf-8")
                    reject = {"path": item.path, "line": item.line, "reason": item.reason}
                    rejects.write(json.dumps(reject) + "\n")
                    bad += 1
            per_file.append(
                {"path": str(path.resolve()), "format": fmt, "records": good, "rejected": bad}
            )
            file_row_ends.append(writer.num_rows)
    finally:
        ids, lines = writer.close()
        if rejects is not None:
            rejects.close()
    _check_unique_ids(ids, lines, files, np.asarray(file_row_ends), staging / DATA_FILE)
    return {
        "num_records": writer.num_rows,
        "num_rejected": sum(f["rejected"] for f in per_file),
        "files": per_file,
        "obj_type_counts": {
            "gene": writer.type_counts[alphabet.GENE],
            "prot": writer.type_counts[alphabet.PROT],
        },
        "total_residues": writer.residues,
        "recipe": recipe.name,
        "recipe_options": recipe.fingerprint_options(),
        "schema": recipe.schema.to_json(),
        **recipe.meta(),
    }


def _check_unique_ids(ids, lines, files, file_row_ends, data_path: Path) -> None:
    """Raise ValueError naming both records if two rows share a sample_id.

    Equal ids come from the same (file name, index, obj_id), e.g. one file copied under two
    directories; resume-by-id could not tell such records apart.
    """
    if ids.size < 2:
        return
    order = np.argsort(ids, kind="stable")
    sorted_ids = ids[order]
    dup = np.flatnonzero(sorted_ids[1:] == sorted_ids[:-1])
    if dup.size == 0:
        return
    # Report the duplicate met first in input order: the pair whose later row comes earliest.
    # The stable sort keeps equal ids in row order, so order[k] < order[k + 1] in each pair.
    k = dup[np.argmin(order[dup + 1])]
    rows = order[k], order[k + 1]
    with pa.memory_map(str(data_path)) as source:
        obj_ids = pa.ipc.open_stream(source).read_all().column("obj_id")
        where = []
        for row in rows:
            file = files[int(np.searchsorted(file_row_ends, row, side="right"))]
            where.append(f"{file}:{lines[row]} (obj_id {obj_ids[int(row)].as_py()!r})")
    raise ValueError(
        f"duplicate sample_id {int(sorted_ids[k])}: {where[0]} and {where[1]} "
        "(the same file name, record position and obj_id; is one file in the inputs twice?)"
    )


def _write_meta(staging: Path, fingerprint: str, options: dict, counts: dict) -> None:
    meta = {
        "version": PREPARED_VERSION,
        "fingerprint": fingerprint,
        **counts,
        "options": options,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    with open(staging / META_FILE, "w", encoding="utf-8") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")


def _check_out_dir_free(out_dir: Path) -> None:
    # os.replace can move a directory onto an empty one, not onto one with contents.
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ValueError(f"{out_dir} already exists and is not empty; remove it or choose another")


def _prepare_files(files: list[Path], out_dir: Path, options: dict, fingerprint: str, recipe: PrepareRecipe):
    """Build the prepared dataset of `files` in a staging dir and move it to `out_dir`."""
    _check_out_dir_free(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.with_name(f"{out_dir.name}.tmp-{os.getpid()}")
    if staging.exists():
        shutil.rmtree(staging)  # left by an earlier crashed run with our pid
    staging.mkdir()
    try:
        counts = _write_records(files, staging, options, recipe)
        if counts["num_records"] == 0:
            raise ValueError(
                f"no records in the inputs ({len(files)} file(s), "
                f"{counts['num_rejected']} rejected): {', '.join(map(str, files))}"
            )
        _write_meta(staging, fingerprint, options, counts)
        try:
            os.replace(staging, out_dir)
        except OSError:
            # Another process may have prepared the same inputs into out_dir meanwhile.
            if is_prepared(out_dir) and _read_meta(out_dir).get("fingerprint") == fingerprint:
                shutil.rmtree(staging)
                return load_prepared(out_dir)
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return load_prepared(out_dir)


def prepare(inputs, out_dir, *, fmt="auto", fasta_obj_type="auto", bad_records="fail", recipe: PrepareRecipe = BASE_RECIPE):
    """Read `inputs` (files and/or directories), validate, and write a prepared dataset.

    recipe: how records become rows (a model family's `prepare_recipe()`); the base recipe stores
    gene/protein records as read.
    fmt: "auto" (by extension) or a registered format (`sources.formats()`) for every file.
    fasta_obj_type: "auto", "gene" or "prot" (see sources.iter_records).
    bad_records: "fail" raises the first bad record (as RecordError 'PATH:LINE: reason');
    "skip" leaves it out and logs it to out_dir/rejects.jsonl.
    Returns the loaded PreparedDataset.
    """
    options = _options(fmt, fasta_obj_type, bad_records)
    files = list_input_files(inputs)
    _check_formats(files, options["fmt"], recipe)  # before hashing everything
    out_dir = Path(out_dir).expanduser()
    fingerprint = fingerprint_inputs(files, {**options, **recipe.fingerprint_options()})
    return _prepare_files(files, out_dir, options, fingerprint, recipe)


def _check_formats(files: list[Path], fmt: str, recipe: PrepareRecipe) -> None:
    """Every input's format is known and one the recipe reads (RecordError naming the file)."""
    for path in files:
        found = detect_format(path) if fmt == "auto" else fmt
        if recipe.formats is not None and found not in recipe.formats:
            raise RecordError(path, None, f"is {found}, which the {recipe.name} recipe does not read; it reads {list(recipe.formats)}")


# --------------------------------------------------------------------------------------------
# Loading


def _read_meta(path: Path) -> dict:
    with open(path / META_FILE, encoding="utf-8") as f:
        meta = json.load(f)
    if not isinstance(meta, dict):
        raise ValueError("meta.json does not hold an object")
    return meta


def is_prepared(path) -> bool:
    """Whether `path` is a directory holding a prepared dataset of this version."""
    path = Path(path)
    if not (path / META_FILE).is_file() or not (path / DATA_FILE).is_file():
        return False
    try:
        return _read_meta(path).get("version") == PREPARED_VERSION
    except (OSError, ValueError):
        return False


def load_prepared(path) -> PreparedDataset:
    """Open a prepared dataset (memory-mapped). Raises ValueError naming `path` if it is broken."""
    import datasets

    path = Path(path)
    for name in (META_FILE, DATA_FILE):
        if not (path / name).is_file():
            raise ValueError(f"{path} is not a prepared dataset: {name} is missing")
    try:
        meta = _read_meta(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path / META_FILE} is unreadable or corrupt: {e}") from None
    if meta.get("version") != PREPARED_VERSION:
        raise ValueError(
            f"{path} was prepared by format version {meta.get('version')!r}; this lucatrain reads "
            f"version {PREPARED_VERSION}: prepare the inputs again"
        )
    try:
        dataset = datasets.Dataset.from_file(str(path / DATA_FILE))
    except Exception as e:  # noqa: BLE001  (pyarrow/datasets raise many types for a bad file)
        raise ValueError(f"{path / DATA_FILE} is unreadable or corrupt: {e}") from None
    schema = Schema.from_json(meta["schema"]) if "schema" in meta else SEQUENCE_SCHEMA
    missing = [c.name for c in schema.all_columns if c.name not in dataset.column_names]
    if missing or dataset.num_rows != meta.get("num_records"):
        raise ValueError(
            f"{path / DATA_FILE} does not match {META_FILE}: {dataset.num_rows} rows "
            f"(meta says {meta.get('num_records')}), missing columns {missing}"
        )
    return PreparedDataset(path, meta, dataset)


def _single_path(inputs) -> Path | None:
    if isinstance(inputs, (str, os.PathLike)):
        return Path(inputs)
    if isinstance(inputs, (list, tuple)) and len(inputs) == 1:
        return Path(inputs[0])
    return None


def prepare_or_load(inputs, cache_dir, recipe: PrepareRecipe = BASE_RECIPE, **options) -> PreparedDataset:
    """A prepared dataset for `inputs`, reusing earlier work.

    If `inputs` is a single prepared directory it is loaded as is (`options` are then unused).
    Otherwise the dataset lives in cache_dir/<fingerprint[:16]>, prepared there on first use; a
    change to any input file or option gives a new fingerprint, hence a fresh preparation.
    """
    single = _single_path(inputs)
    if single is not None and is_prepared(single):
        data = load_prepared(single)
        prepared_with = (data.recipe, data.meta.get("recipe_options", {}))
        if prepared_with != (recipe.name, json.loads(json.dumps(recipe.fingerprint_options()))):
            raise ValueError(
                f"{single} was prepared by the {data.recipe} recipe with {prepared_with[1]}; this run needs {recipe.name} "
                f"with {recipe.fingerprint_options()}: pass the raw input files, or prepare them for this run's settings"
            )
        return data
    opts = _options(**options)
    files = list_input_files(inputs)
    _check_formats(files, opts["fmt"], recipe)
    fingerprint = fingerprint_inputs(files, {**opts, **recipe.fingerprint_options()})
    out_dir = Path(cache_dir).expanduser() / fingerprint[:16]
    if is_prepared(out_dir):
        dataset = load_prepared(out_dir)
        if dataset.fingerprint != fingerprint:
            raise ValueError(
                f"{out_dir} holds a prepared dataset with fingerprint {dataset.fingerprint}, "
                f"expected {fingerprint}; remove it"
            )
        return dataset
    return _prepare_files(files, out_dir, opts, fingerprint, recipe)


class PreparedDataset:
    """A prepared dataset: the memory-mapped Arrow table plus numpy views of its small columns.

    `sample_ids` and `lengths` (and `obj_types`, where the schema has molecule types) are numpy
    arrays over all rows (row order = input order), for samplers and length bucketing without
    touching the sequences. `rows(indices, columns)` reads whole records.
    """

    def __init__(self, path: Path, meta: dict, dataset):
        self.path = Path(path)
        self.meta = meta
        self.fingerprint: str = meta["fingerprint"]
        self.recipe: str = meta.get("recipe", "lucaone")  # datasets from before recipes were LucaOne's
        self.schema = Schema.from_json(meta["schema"]) if "schema" in meta else SEQUENCE_SCHEMA
        self.dataset = dataset
        self.num_records: int = dataset.num_rows
        table = dataset.data
        self.sample_ids: np.ndarray = table.column("sample_id").to_numpy()  # int64 (N,)
        self.lengths: np.ndarray = table.column("length").to_numpy()  # int32 (N,)
        names = table.column_names
        self.obj_types: np.ndarray | None = table.column("obj_type").to_numpy() if "obj_type" in names else None  # int8 (N,)
        # Every column but `length`, which the numpy view above already holds.
        self.column_names = [name for name in names if name != "length"]
        # Row gathers go batch by batch: pyarrow's take on a many-chunk table would first
        # concatenate every chunk (the whole file) on each call.
        self._batches = table.table.select(self.column_names).to_batches()
        self._batch_starts = np.cumsum([0] + [b.num_rows for b in self._batches])
        self._sorted_ids: np.ndarray | None = None
        self._sorted_order: np.ndarray | None = None

    def __len__(self) -> int:
        return self.num_records

    def __repr__(self) -> str:
        return f"PreparedDataset({str(self.path)!r}, num_records={self.num_records})"

    def __reduce__(self):
        # Re-open from disk in another process (spawned DataLoader workers) instead of
        # pickling the arrays and the memory map.
        return (load_prepared, (str(self.path),))

    def present(self, modality: str) -> np.ndarray:
        """(N,) bool: which samples carry `modality` (a column the schema lists in `modalities`)."""
        if modality not in self.schema.modalities:
            raise KeyError(f"{modality!r} is not a modality of {self.path} (modalities: {list(self.schema.modalities)})")
        return self.dataset.data.column(f"{modality}_present").to_numpy(zero_copy_only=False)

    def rows(self, indices, columns=None) -> dict:
        """`columns` (default: all but length) of rows `indices` (any order, repeats ok), as lists."""
        columns = self.column_names if columns is None else ["sample_id", *(c for c in columns if c != "sample_id")]
        unknown = [c for c in columns if c not in self.column_names]
        if unknown:
            raise KeyError(f"{self.path} has no column(s) {unknown}; columns are {self.column_names}")
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_records):
            bad = idx[(idx < 0) | (idx >= self.num_records)][0]
            raise IndexError(f"row {bad} out of range for {self.num_records} records")
        out = {name: [None] * idx.size for name in columns}
        batch_of = np.searchsorted(self._batch_starts, idx, side="right") - 1
        order = np.argsort(batch_of, kind="stable")  # group the requests by batch
        bounds = np.flatnonzero(np.diff(batch_of[order])) + 1
        for group in np.split(order, bounds):
            if group.size == 0:
                continue
            b = int(batch_of[group[0]])
            local = idx[group] - self._batch_starts[b]
            taken = self._batches[b].select(columns).take(pa.array(local, type=pa.int64())).to_pydict()
            for name, values in out.items():
                for position, value in zip(group.tolist(), taken[name]):
                    values[position] = value
        return out

    def index_of_ids(self, ids) -> np.ndarray:
        """Row positions (int64) of the given sample ids; -1 for an id not in this dataset."""
        if self._sorted_ids is None:
            self._sorted_order = np.argsort(self.sample_ids, kind="stable")
            self._sorted_ids = self.sample_ids[self._sorted_order]
        ids = np.asarray(ids, dtype=np.int64)
        pos = np.searchsorted(self._sorted_ids, ids)
        pos = np.minimum(pos, self._sorted_ids.size - 1)
        found = self._sorted_ids[pos] == ids
        return np.where(found, self._sorted_order[pos], -1).astype(np.int64)
