"""The prepared dataset: input files validated once and stored as one memory-mapped Arrow file.

`prepare` reads every input record (see `sources`), turns it into a row with the model family's
recipe (`schema.PrepareRecipe`), applies the bad-record policy, gives each record a stable 63-bit
`sample_id`, and writes

    out_dir/data.arrow      Arrow IPC stream: sample_id, the recipe's columns (the base and LucaOne
                            recipes: obj_id, obj_type, seq, labels), modality masks, length
    out_dir/meta.json       version, fingerprint, recipe and its schema, counts per file and per
                            type, options, the recipe's statistics, time; what a user should hear
                            about: files of input directories that were left out, duplicate obj_ids,
                            records typed `prot` that look like nucleotides (`warnings_of` says it)
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
import logging
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
    guess_obj_type,
    list_input_files,
)

PREPARED_VERSION = 2  # 2: labels checked by the family's recipe (LucaOne: per-task stats in meta.json)
BAD_RECORD_POLICIES = ("fail", "skip")
DUPLICATE_POLICIES = ("keep", "drop", "fail")
_EXAMPLES = 3  # records named per warning in the log and in meta.json

logger = logging.getLogger("lucatrain")

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


def _options(fmt: str = "auto", fasta_obj_type: str = "auto", bad_records: str = "fail", duplicates: str = "keep") -> dict:
    """The validated prepare options, with defaults filled in (see `_fingerprinted`)."""
    if bad_records not in BAD_RECORD_POLICIES:
        raise ValueError(f"bad_records must be one of {BAD_RECORD_POLICIES}, got {bad_records!r}")
    if duplicates not in DUPLICATE_POLICIES:
        raise ValueError(f"duplicates must be one of {DUPLICATE_POLICIES}, got {duplicates!r}")
    if fmt != "auto" and fmt not in formats():
        raise ValueError(f"fmt must be 'auto' or one of {list(formats())}, got {fmt!r}")
    if fasta_obj_type not in ("auto", "gene", "prot"):
        raise ValueError(f"fasta_obj_type must be 'auto', 'gene' or 'prot', got {fasta_obj_type!r}")
    return {"fmt": fmt, "fasta_obj_type": fasta_obj_type, "bad_records": bad_records, "duplicates": duplicates}


def _fingerprinted(options: dict, recipe: PrepareRecipe) -> dict:
    """The options that change what is stored, hence the fingerprint (and with it the sample order).
    `duplicates` does only when records are dropped: 'keep' and 'fail' store the same rows, and
    datasets prepared before the option existed keep their fingerprint."""
    stored = {k: v for k, v in options.items() if k != "duplicates" or v == "drop"}
    return {**stored, **recipe.fingerprint_options()}

# --------------------------------------------------------------------------------------------
# Writing


class _BatchWriter:
    """Buffers records column-wise and writes them to an Arrow IPC stream in record batches.

    Besides the Arrow file it keeps, per row, only the sample id, source line and a hash of the
    obj_id as numpy chunks (24 bytes a row), for the duplicate checks at the end.
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
        self._obj_keys: list[np.ndarray] = []
        self._line_buffer: list[int] = []
        self._obj_key_buffer: list[int] = []
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
        self._obj_key_buffer.append(obj_id_key(record.obj_id))
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
        self._obj_keys.append(np.asarray(self._obj_key_buffer, dtype=np.int64))
        for values in cols.values():
            values.clear()
        self._line_buffer.clear()
        self._obj_key_buffer.clear()
        self._chars = 0

    def close(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Flush, close the file, and return (sample_ids, lines, obj_id keys) of all rows written."""
        self.flush()
        self._writer.close()
        self._sink.close()

        def joined(chunks):
            return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

        return joined(self._ids), joined(self._lines), joined(self._obj_keys)


def obj_id_key(obj_id: str) -> int:
    """A 63-bit hash of an obj_id: duplicates are found by sorting these, not by holding the strings."""
    digest = hashlib.blake2b(obj_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & _ID_MASK


def _write_records(files: list[Path], staging: Path, options: dict, recipe: PrepareRecipe) -> dict:
    """Write every good record of `files` into `staging`; return the counts for meta.json.

    With bad_records="fail" the first RecordError is raised; with "skip" it goes to rejects.jsonl.
    A record the recipe refuses (ValueError) is a bad record like one the reader refused. With
    duplicates="drop" a record whose obj_id came before is left out (the first one is kept).
    """
    recipe.start()
    writer = _BatchWriter(staging / DATA_FILE, recipe)
    rejects = None
    per_file = []
    file_row_ends = []  # cumulative row count after each file: maps a row back to its file
    # Only for duplicates="drop": keys of the obj_ids written so far (about 70 bytes per record).
    seen_keys: set[int] | None = set() if options["duplicates"] == "drop" else None
    dropped: list[str] = []
    dropped_count = 0
    prot_like_gene: list[str] = []
    prot_like_gene_count = 0
    try:
        for path in files:
            fmt = detect_format(path) if options["fmt"] == "auto" else options["fmt"]
            good = bad = 0
            for item in recipe.read(path, fmt, options["fasta_obj_type"]):
                if not isinstance(item, RecordError):
                    if seen_keys is not None:
                        key = obj_id_key(item.obj_id)
                        if key in seen_keys:
                            dropped_count += 1
                            if len(dropped) < _EXAMPLES:
                                dropped.append(f"{item.path}:{item.line} (obj_id {item.obj_id!r})")
                            continue
                        seen_keys.add(key)
                    try:
                        writer.add(item, sample_id_of(path.name, item.index, item.obj_id))
                        good += 1
                    except ValueError as err:
                        item = RecordError(item.path, item.line, str(err))
                    else:
                        if item.obj_type == alphabet.PROT and guess_obj_type(item.seq) == alphabet.GENE:
                            prot_like_gene_count += 1
                            if len(prot_like_gene) < _EXAMPLES:
                                prot_like_gene.append(f"{item.path}:{item.line} (obj_id {item.obj_id!r})")
                        continue
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
        ids, lines, obj_keys = writer.close()
        if rejects is not None:
            rejects.close()
    row_ends = np.asarray(file_row_ends)
    _check_unique_ids(ids, lines, files, row_ends, staging / DATA_FILE)
    if seen_keys is not None:
        duplicates = {"policy": "drop", "records": dropped_count, "examples": dropped}
    else:
        duplicates = _duplicate_obj_ids(obj_keys, lines, files, row_ends, staging / DATA_FILE, options["duplicates"])
    return {
        "num_records": writer.num_rows,
        "num_rejected": sum(f["rejected"] for f in per_file),
        "files": per_file,
        "obj_type_counts": {
            "gene": writer.type_counts[alphabet.GENE],
            "prot": writer.type_counts[alphabet.PROT],
        },
        "total_residues": writer.residues,
        "duplicate_obj_ids": duplicates,
        "prot_like_nucleotides": {"records": prot_like_gene_count, "examples": prot_like_gene},
        "recipe": recipe.name,
        "recipe_options": recipe.fingerprint_options(),
        "schema": recipe.schema.to_json(),
        **recipe.meta(),
    }


def _where(row: int, lines, files, file_row_ends, obj_ids) -> str:
    file = files[int(np.searchsorted(file_row_ends, row, side="right"))]
    return f"{file}:{lines[row]} (obj_id {obj_ids[int(row)].as_py()!r})"


def _obj_id_column(data_path: Path):
    with pa.memory_map(str(data_path)) as source:
        return pa.ipc.open_stream(source).read_all().column("obj_id")


def _duplicate_obj_ids(keys, lines, files, file_row_ends, data_path: Path, policy: str) -> dict:
    """Rows sharing an obj_id (with policy 'keep' or 'fail'): counts and the first examples, or
    ValueError naming both records of the first duplicate (policy 'fail').

    A duplicate trains twice under two sample ids. It is found by sorting 63-bit hashes; the
    examples are checked against the real strings, so a hash collision is never reported.
    """
    found = {"policy": policy, "records": 0, "ids": 0, "examples": []}
    if keys.size < 2:
        return found
    order = np.argsort(keys, kind="stable")  # equal keys stay in row order
    sorted_keys = keys[order]
    repeat = np.flatnonzero(sorted_keys[1:] == sorted_keys[:-1]) + 1  # sorted positions of later copies
    if repeat.size == 0:
        return found
    obj_ids = _obj_id_column(data_path)
    first_of_group = np.searchsorted(sorted_keys, sorted_keys[repeat])  # the first copy's sorted position
    pairs = sorted(zip(order[repeat].tolist(), order[first_of_group].tolist()))  # (later row, first row), input order
    pairs = [(later, first) for later, first in pairs if obj_ids[later].as_py() == obj_ids[first].as_py()]
    if not pairs:
        return found
    found["records"] = len(pairs)
    found["ids"] = len({first for _, first in pairs})
    found["examples"] = [
        f"{_where(later, lines, files, file_row_ends, obj_ids)} repeats {_where(first, lines, files, file_row_ends, obj_ids)}"
        for later, first in pairs[:_EXAMPLES]
    ]
    if policy == "fail":
        raise _duplicates_refused(found)
    return found


def _duplicates_refused(found: dict) -> ValueError:
    return ValueError(f"duplicate obj_id: {found['examples'][0]}; {found['records']} record(s) repeat an earlier obj_id. "
                      "Remove them, or set data.duplicates=drop (keep the first) or keep (train each copy)")  # fmt: skip


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
    obj_ids = _obj_id_column(data_path)
    where = [_where(row, lines, files, file_row_ends, obj_ids) for row in (order[k], order[k + 1])]
    raise ValueError(
        f"duplicate sample_id {int(sorted_ids[k])}: {where[0]} and {where[1]} "
        "(the same file name, record position and obj_id; is one file in the inputs twice?)"
    )


def _write_meta(staging: Path, fingerprint: str, options: dict, counts: dict, skipped) -> None:
    meta = {
        "version": PREPARED_VERSION,
        "fingerprint": fingerprint,
        **counts,
        "skipped_files": _skipped_json(skipped),
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


def _skipped_json(skipped) -> list[dict]:
    return [{"path": str(path), "reason": reason} for path, reason in skipped]


def warnings_of(data: PreparedDataset, skipped=None) -> list[str]:
    """What a user must hear about a prepared dataset before training on it (one line each): files of
    input directories that were left out (`skipped`: from this listing, else from meta.json),
    duplicate obj_ids, records typed `prot` that look like nucleotides."""
    meta, lines = data.meta, []
    left_out = _skipped_json(skipped) if skipped is not None else meta.get("skipped_files", [])
    if left_out:
        named = "; ".join(f"{item['path']} ({item['reason']})" for item in left_out[:10])
        more = f" and {len(left_out) - 10} more" if len(left_out) > 10 else ""
        lines.append(f"{len(left_out)} file(s) in the input directories are not read: {named}{more}")
    dup = meta.get("duplicate_obj_ids") or {}
    if dup.get("records"):
        if dup["policy"] == "drop":
            lines.append(f"{dup['records']} record(s) repeating an earlier obj_id were dropped (data.duplicates=drop), "
                         f"e.g. {'; '.join(dup['examples'])}")  # fmt: skip
        else:
            lines.append(f"{dup['records']} record(s) repeat the obj_id of an earlier one ({dup['ids']} obj_id(s)) and are "
                         f"trained once per copy, e.g. {'; '.join(dup['examples'])}; data.duplicates=drop keeps "
                         "only the first, data.duplicates=fail refuses them")  # fmt: skip
    nucleotide = meta.get("prot_like_nucleotides") or {}
    if nucleotide.get("records"):
        lines.append(f"{nucleotide['records']} record(s) typed prot consist of nucleotide letters (>= 90% A/C/G/T/U/N) and "
                     f"are trained as proteins, e.g. {'; '.join(nucleotide['examples'])}: check their obj_type")  # fmt: skip
    return lines


def _warn(data: PreparedDataset, skipped=None) -> PreparedDataset:
    for line in warnings_of(data, skipped):
        logger.warning("%s: %s", data.path, line)
    return data


def _prepare_files(files: list[Path], out_dir: Path, options: dict, fingerprint: str, recipe: PrepareRecipe, skipped=()):
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
        _write_meta(staging, fingerprint, options, counts, skipped)
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


def prepare(inputs, out_dir, *, fmt="auto", fasta_obj_type="auto", bad_records="fail", duplicates="keep",
            recipe: PrepareRecipe = BASE_RECIPE):  # fmt: skip
    """Read `inputs` (files and/or directories), validate, and write a prepared dataset.

    recipe: how records become rows (a model family's `prepare_recipe()`); the base recipe stores
    gene/protein records as read.
    fmt: "auto" (by extension) or a registered format (`sources.formats()`) for every file.
    fasta_obj_type: "auto", "gene" or "prot" (see sources.iter_records).
    bad_records: "fail" raises the first bad record (as RecordError 'PATH:LINE: reason');
    "skip" leaves it out and logs it to out_dir/rejects.jsonl.
    duplicates: records sharing an obj_id: "keep" (warn, train each copy), "drop" (keep the first),
    "fail" (ValueError naming both).
    Returns the loaded PreparedDataset; what it left out or found suspicious is logged (`warnings_of`).
    """
    options = _options(fmt, fasta_obj_type, bad_records, duplicates)
    skipped: list = []
    files = list_input_files(inputs, skipped, recipe.formats)
    _check_formats(files, options["fmt"], recipe)  # before hashing everything
    out_dir = Path(out_dir).expanduser()
    fingerprint = fingerprint_inputs(files, _fingerprinted(options, recipe))
    return _warn(_prepare_files(files, out_dir, options, fingerprint, recipe, skipped), skipped)


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
        return _warn(data)
    opts = _options(**options)
    skipped: list = []
    files = list_input_files(inputs, skipped, recipe.formats)
    _check_formats(files, opts["fmt"], recipe)
    fingerprint = fingerprint_inputs(files, _fingerprinted(opts, recipe))
    out_dir = Path(cache_dir).expanduser() / fingerprint[:16]
    if is_prepared(out_dir):
        dataset = load_prepared(out_dir)
        if dataset.fingerprint != fingerprint:
            raise ValueError(
                f"{out_dir} holds a prepared dataset with fingerprint {dataset.fingerprint}, "
                f"expected {fingerprint}; remove it"
            )
        found = dataset.meta.get("duplicate_obj_ids") or {}
        if opts["duplicates"] == "fail" and found.get("records"):
            raise _duplicates_refused(found)  # prepared earlier with 'keep' (the same fingerprint)
        return _warn(dataset, skipped)
    return _warn(_prepare_files(files, out_dir, opts, fingerprint, recipe, skipped), skipped)


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
