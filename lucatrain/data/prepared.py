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
Python objects; the inputs are cut into shards that worker processes prepare in parallel (see
"Shards" below). The output appears atomically: it is built in `<out_dir>.partial` beside `out_dir`
and renamed into place at the end, so a failed or killed prepare never leaves a half-written
dataset, and a killed one run again reuses the shards it had finished.

A sample_id hashes (file name, record index, obj_id): it does not depend on the directory the
data lives in, nor on which other files are in the inputs, so a resumed run can find the records
it has already seen by id even after the data moves or grows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from lucatrain.data import alphabet
from lucatrain.data.schema import PrepareRecipe, Schema, SEQUENCE_SCHEMA
from lucatrain.data.sources import (
    FastaSpan,
    RecordError,
    _strip_compression,
    detect_format,
    fasta_spans,
    formats,
    guess_obj_type,
    iter_records,
    list_input_files,
)
from lucatrain.faults import kill_at

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

    def abort(self) -> None:
        """Close the file without flushing (it is about to be deleted)."""
        for closable in (self._writer, self._sink):
            try:
                closable.close()
            except Exception:  # noqa: BLE001  (already closed, or broken by the error being handled)
                pass

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


# --------------------------------------------------------------------------------------------
# Shards: the unit of parallel and resumable work
#
# The inputs are cut into shards of about `_SHARD_BYTES` of input: a run of small files, or one byte
# range of a large uncompressed FASTA file (`sources.fasta_spans`; records keep the index and line of
# a whole-file read). Each shard is prepared on its own, in a worker process or in this one, into
# `<out_dir>.partial/shards/`; its summary file, written last by rename, marks it finished. A killed
# prepare restarted with the same inputs and options reuses every finished shard. At the end the
# shards are streamed, in order, into one data.arrow, checked, and the dataset moved into place.

_SHARD_BYTES = 32 * 2**20  # input bytes per shard: enough work to amortise a shard's files
_INLINE_BYTES = 16 * 2**20  # inputs smaller than this are prepared in the calling process
PARTIAL_SUFFIX = ".partial"


@dataclass(frozen=True)
class _Piece:
    file: int  # index into the input files
    span: FastaSpan | None = None  # None: the whole file


@dataclass(frozen=True)
class _Shard:
    number: int
    pieces: tuple[_Piece, ...]
    size: int  # input bytes

    def to_json(self) -> dict:
        return {"pieces": [[p.file, *(dataclasses.astuple(p.span) if p.span else ())] for p in self.pieces], "size": self.size}


def _plan_shards(files: list[Path], formats_of: list[str], recipe: PrepareRecipe, shard_bytes: int) -> list[_Shard]:
    """Shards of about `shard_bytes` of input, in input order."""
    # A recipe that reads files its own way (e.g. one HDF5 group) gets whole files.
    by_range = type(recipe).read is PrepareRecipe.read
    shards: list[_Shard] = []
    pending: list[_Piece] = []
    pending_size = 0

    def close_pending():
        nonlocal pending, pending_size
        if pending:
            shards.append(_Shard(len(shards), tuple(pending), pending_size))
        pending, pending_size = [], 0

    for i, (path, fmt) in enumerate(zip(files, formats_of)):
        size = path.stat().st_size
        if by_range and fmt == "fasta" and _strip_compression(path.name)[1] is None and size > shard_bytes:
            close_pending()
            for span in fasta_spans(path, shard_bytes):
                shards.append(_Shard(len(shards), (_Piece(i, span),), span.end - span.start))
        else:
            pending.append(_Piece(i))
            pending_size += size
            if pending_size >= shard_bytes:
                close_pending()
    close_pending()
    return shards


def _shard_file(shard_dir: Path, number: int, suffix: str) -> Path:
    return shard_dir / f"{number:06d}{suffix}"


def _prepare_shard(shard: _Shard, files: list[Path], formats_of: list[str], options: dict, recipe: PrepareRecipe,
                   shard_dir: Path, seen_keys: set[int] | None = None) -> dict:  # fmt: skip
    """Write one shard (arrow, id arrays, rejects) and, last, its summary; return the summary.

    With bad_records="fail" the first RecordError is raised; with "skip" it goes to the shard's rejects.
    A record the recipe refuses (ValueError) is a bad record like one the reader refused. With
    duplicates="drop", `seen_keys` holds the obj_id keys of every earlier shard and grows with this one's.
    """
    recipe.start()
    final = {name: _shard_file(shard_dir, shard.number, name) for name in (".arrow", ".ids.npz", ".rejects.jsonl")}
    temporary = {name: path.with_name(f"{path.name}.tmp-{os.getpid()}") for name, path in final.items()}
    writer = _BatchWriter(temporary[".arrow"], recipe)
    rejects = None
    pieces = []
    dropped = {"records": 0, "examples": []}
    prot_like = {"records": 0, "examples": []}
    try:
        for piece in shard.pieces:
            path, fmt = files[piece.file], formats_of[piece.file]
            if piece.span is None:
                reader = recipe.read(path, fmt, options["fasta_obj_type"])
            else:
                reader = iter_records(path, fmt, options["fasta_obj_type"], span=piece.span)
            good = bad = 0
            for item in reader:
                if not isinstance(item, RecordError):
                    if seen_keys is not None:
                        key = obj_id_key(item.obj_id)
                        if key in seen_keys:
                            _count_example(dropped, f"{item.path}:{item.line} (obj_id {item.obj_id!r})")
                            continue
                        seen_keys.add(key)
                    try:
                        writer.add(item, sample_id_of(path.name, item.index, item.obj_id))
                        good += 1
                    except ValueError as err:
                        item = RecordError(item.path, item.line, str(err))
                    else:
                        if item.obj_type == alphabet.PROT and guess_obj_type(item.seq) == alphabet.GENE:
                            _count_example(prot_like, f"{item.path}:{item.line} (obj_id {item.obj_id!r})")
                        continue
                if options["bad_records"] == "fail":
                    raise item
                if rejects is None:
                    rejects = open(temporary[".rejects.jsonl"], "w", encoding="utf-8")
                rejects.write(json.dumps({"path": item.path, "line": item.line, "reason": item.reason}) + "\n")
                bad += 1
            pieces.append({"file": piece.file, "format": fmt, "records": good, "rejected": bad})
        ids, lines, obj_keys = writer.close()
        with open(temporary[".ids.npz"], "wb") as out:
            np.savez(out, ids=ids, lines=lines, obj_keys=obj_keys)
    except BaseException:
        writer.abort()
        for path in temporary.values():
            path.unlink(missing_ok=True)
        raise
    finally:
        if rejects is not None:
            rejects.close()
    summary = {"pieces": pieces, "num_rows": writer.num_rows, "residues": writer.residues,
               "type_counts": {"gene": writer.type_counts[alphabet.GENE], "prot": writer.type_counts[alphabet.PROT]},
               "dropped": dropped, "prot_like": prot_like, "recipe_meta": recipe.meta()}  # fmt: skip
    for name, path in temporary.items():
        if path.exists():
            os.replace(path, final[name])
    _write_json_atomically(_shard_file(shard_dir, shard.number, ".json"), summary)  # last: the shard is finished
    return summary


def _count_example(tally: dict, example: str) -> None:
    tally["records"] += 1
    if len(tally["examples"]) < _EXAMPLES:
        tally["examples"].append(example)


def _write_json_atomically(path: Path, value) -> None:
    tmp = path.with_name(path.name + f".tmp-{os.getpid()}")
    tmp.write_text(json.dumps(value))
    os.replace(tmp, path)


def _read_finished(shard_dir: Path, number: int) -> dict | None:
    """A finished shard's summary, or None (not finished, or its files are incomplete)."""
    path = _shard_file(shard_dir, number, ".json")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (_shard_file(shard_dir, number, ".arrow").is_file() and _shard_file(shard_dir, number, ".ids.npz").is_file()):
        return None
    return summary


def _open_partial(partial: Path, plan: dict) -> Path:
    """The shard directory of `partial`, kept when it holds the same plan, else started afresh."""
    shard_dir = partial / "shards"
    plan_path = partial / "plan.json"
    try:
        kept = json.loads(plan_path.read_text()) == plan
    except (OSError, ValueError):
        kept = False
    if partial.exists() and not kept:
        logger.info("%s: an interrupted prepare of other inputs or options; starting over", partial)
        shutil.rmtree(partial)
    if not kept:
        shard_dir.mkdir(parents=True)
        _write_json_atomically(plan_path, plan)
    for leftover in shard_dir.glob("*.tmp-*"):  # what a killed worker was writing
        leftover.unlink()
    return shard_dir


def _run_shards(shards, files, formats_of, options, recipe, shard_dir: Path, workers: int) -> list[dict]:
    """Every shard's summary, in order: the finished ones read back, the others prepared now."""
    summaries: dict[int, dict] = {}
    for shard in shards:
        if (found := _read_finished(shard_dir, shard.number)) is not None:
            summaries[shard.number] = found
    todo = [shard for shard in shards if shard.number not in summaries]
    if summaries:
        logger.info("resuming an interrupted prepare: %d of %d shards are finished", len(summaries), len(shards))
    total = sum(shard.size for shard in shards)
    progress = _progress_bar(total, initial=total - sum(shard.size for shard in todo))
    finished_now = 0

    def finished(number: int, summary: dict) -> None:
        nonlocal finished_now
        summaries[number] = summary
        progress.update(shards[number].size)
        progress.set_postfix(records=f"{sum(s['num_rows'] for s in summaries.values()):,}", refresh=False)
        finished_now += 1
        kill_at("prepare_shard", finished_now)  # test hook: SIGKILL after that many shards

    try:
        if options["duplicates"] == "drop" or workers <= 1 or len(todo) <= 1:
            # "drop" keeps the first copy in input order, so its shards run in order, in this process.
            seen = None
            if options["duplicates"] == "drop":
                seen = set()
                for shard in shards:
                    if shard.number in summaries:
                        seen.update(np.load(_shard_file(shard_dir, shard.number, ".ids.npz"))["obj_keys"].tolist())
            for shard in todo:
                finished(shard.number, _prepare_shard(shard, files, formats_of, options, recipe, shard_dir, seen))
        else:
            _run_in_workers(todo, files, formats_of, options, recipe, shard_dir, workers, finished)
    finally:
        progress.close()
    return [summaries[shard.number] for shard in shards]


def _run_in_workers(todo, files, formats_of, options, recipe, shard_dir, workers, finished) -> None:
    """Prepare `todo` in `workers` fresh processes (spawned: the caller may hold threads or a process
    group that a fork would copy). A bad record stops the work; the first in input order is raised."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    errors: dict[int, BaseException] = {}
    pool = ProcessPoolExecutor(min(workers, len(todo)), mp_context=multiprocessing.get_context("spawn"),
                               initializer=_exit_with_parent, initargs=(os.getpid(),))  # fmt: skip
    with pool:
        futures = {pool.submit(_prepare_shard, shard, files, formats_of, options, recipe, shard_dir): shard.number for shard in todo}
        for future in as_completed(futures):
            try:
                summary = future.result()
            except BaseException as err:  # noqa: BLE001  (re-raised below, the first in input order)
                if not any(err is seen for seen in errors.values()):  # a broken pool fails every future alike
                    errors[futures[future]] = err
                for other in futures:
                    other.cancel()
                continue
            finished(futures[future], summary)
    if errors:
        raise errors[min(errors)]


def _exit_with_parent(parent: int) -> None:
    """In a worker: end this process soon after the prepare that started it dies (e.g. SIGKILLed),
    instead of living on idle. Its unfinished shard stays unfinished; the restart redoes it."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    # disable=None: shown on a terminal, silent in logs and tests.
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, desc="prepare", disable=None, dynamic_ncols=True)


def _assemble(shards, summaries, files, staging: Path, options: dict, recipe: PrepareRecipe, shard_dir: Path) -> dict:
    """Stream the shards, in order, into staging/data.arrow (+ rejects.jsonl); check ids; the counts."""
    schema = recipe.schema.arrow()
    with pa.OSFile(str(staging / DATA_FILE), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for shard in shards:
            with pa.memory_map(str(_shard_file(shard_dir, shard.number, ".arrow"))) as source:
                for batch in pa.ipc.open_stream(source):
                    writer.write_batch(batch)
    rejected_files = [_shard_file(shard_dir, shard.number, ".rejects.jsonl") for shard in shards]
    rejected_files = [path for path in rejected_files if path.exists()]
    if rejected_files:
        with open(staging / REJECTS_FILE, "wb") as out:
            for path in rejected_files:
                with open(path, "rb") as part:
                    shutil.copyfileobj(part, out)
    arrays = [np.load(_shard_file(shard_dir, shard.number, ".ids.npz")) for shard in shards]
    ids, lines, obj_keys = (np.concatenate([a[name] for a in arrays]) for name in ("ids", "lines", "obj_keys"))
    per_file = [{"path": str(path.resolve()), "format": None, "records": 0, "rejected": 0} for path in files]
    for summary in summaries:
        for piece in summary["pieces"]:
            entry = per_file[piece["file"]]
            entry["format"] = piece["format"]
            entry["records"] += piece["records"]
            entry["rejected"] += piece["rejected"]
    row_ends = np.cumsum([entry["records"] for entry in per_file])  # maps a row back to its file
    _check_unique_ids(ids, lines, files, row_ends, staging / DATA_FILE)
    if options["duplicates"] == "drop":
        duplicates = {"policy": "drop", **_merged_tallies(s["dropped"] for s in summaries)}
    else:
        duplicates = _duplicate_obj_ids(obj_keys, lines, files, row_ends, staging / DATA_FILE, options["duplicates"])
    return {
        "num_records": sum(s["num_rows"] for s in summaries),
        "num_rejected": sum(entry["rejected"] for entry in per_file),
        "files": per_file,
        "obj_type_counts": {kind: sum(s["type_counts"][kind] for s in summaries) for kind in ("gene", "prot")},
        "total_residues": sum(s["residues"] for s in summaries),
        "duplicate_obj_ids": duplicates,
        "prot_like_nucleotides": _merged_tallies(s["prot_like"] for s in summaries),
        "recipe": recipe.name,
        "recipe_options": recipe.fingerprint_options(),
        "schema": recipe.schema.to_json(),
        **recipe.merge_meta([s["recipe_meta"] for s in summaries]),
    }


def _merged_tallies(tallies) -> dict:
    merged = {"records": 0, "examples": []}
    for tally in tallies:
        merged["records"] += tally["records"]
        merged["examples"].extend(tally["examples"][: _EXAMPLES - len(merged["examples"])])
    return merged


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


def _prepare_files(files: list[Path], out_dir: Path, options: dict, fingerprint: str, recipe: PrepareRecipe, skipped=(),
                   workers: int | None = None, shard_bytes: int = _SHARD_BYTES):  # fmt: skip
    """Build the prepared dataset of `files` in `<out_dir>.partial` (shard by shard, resumable) and
    move it to `out_dir`: the dataset appears whole or not at all."""
    _check_out_dir_free(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with _prepare_lock(out_dir.parent):
        if is_prepared(out_dir) and _read_meta(out_dir).get("fingerprint") == fingerprint:
            return load_prepared(out_dir)  # another process prepared the same inputs while we waited
        _check_out_dir_free(out_dir)
        formats_of = [detect_format(path) if options["fmt"] == "auto" else options["fmt"] for path in files]
        shards = _plan_shards(files, formats_of, recipe, shard_bytes)
        partial = out_dir.with_name(out_dir.name + PARTIAL_SUFFIX)
        plan = {"fingerprint": fingerprint, "options": options, "files": [str(path.resolve()) for path in files],
                "shards": [shard.to_json() for shard in shards]}  # fmt: skip
        shard_dir = _open_partial(partial, plan)
        if workers is None or workers <= 0:  # auto: small inputs in this process, large ones on every core
            total = sum(shard.size for shard in shards)
            workers = 1 if total < _INLINE_BYTES else min(len(shards), os.cpu_count() or 1)
        try:
            summaries = _run_shards(shards, files, formats_of, options, recipe, shard_dir, workers)
            staging = partial / "dataset"
            if staging.exists():
                shutil.rmtree(staging)  # an assembly that was interrupted
            staging.mkdir()
            counts = _assemble(shards, summaries, files, staging, options, recipe, shard_dir)
            if counts["num_records"] == 0:
                raise ValueError(
                    f"no records in the inputs ({len(files)} file(s), "
                    f"{counts['num_rejected']} rejected): {', '.join(map(str, files))}"
                )
            _write_meta(staging, fingerprint, options, counts, skipped)
        except Exception:
            # Bad input: the fix changes the fingerprint, so the finished shards would never be reused.
            # An interruption (KeyboardInterrupt, a kill) keeps them for the restart.
            shutil.rmtree(partial, ignore_errors=True)
            raise
        os.replace(staging, out_dir)
        shutil.rmtree(partial)
    return load_prepared(out_dir)


@contextlib.contextmanager
def _prepare_lock(directory: Path):
    """One prepare at a time in `directory` (e.g. two runs sharing a cache): an flock on the directory
    itself, which the kernel releases when the holder dies, so a killed prepare never blocks the next
    one and no lock file is left behind."""
    import fcntl

    fd = os.open(directory, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def prepare(inputs, out_dir, *, fmt="auto", fasta_obj_type="auto", bad_records="fail", duplicates="keep",
            recipe: PrepareRecipe = BASE_RECIPE, workers: int | None = None, shard_bytes: int = _SHARD_BYTES):  # fmt: skip
    """Read `inputs` (files and/or directories), validate, and write a prepared dataset.

    recipe: how records become rows (a model family's `prepare_recipe()`); the base recipe stores
    gene/protein records as read.
    fmt: "auto" (by extension) or a registered format (`sources.formats()`) for every file.
    fasta_obj_type: "auto", "gene" or "prot" (see sources.iter_records).
    bad_records: "fail" raises the first bad record (as RecordError 'PATH:LINE: reason');
    "skip" leaves it out and logs it to out_dir/rejects.jsonl.
    duplicates: records sharing an obj_id: "keep" (warn, train each copy), "drop" (keep the first),
    "fail" (ValueError naming both).
    workers: processes preparing shards at once (None or 0: one for inputs under 16 MB, else one per
    CPU); shard_bytes: input bytes per shard. Neither changes the dataset, only how fast it is made.
    An interrupted prepare, run again with the same inputs and options, reuses its finished shards.
    Returns the loaded PreparedDataset; what it left out or found suspicious is logged (`warnings_of`).
    """
    options = _options(fmt, fasta_obj_type, bad_records, duplicates)
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be at least 1, got {shard_bytes}")
    skipped: list = []
    files = list_input_files(inputs, skipped, recipe.formats)
    _check_formats(files, options["fmt"], recipe)  # before hashing everything
    out_dir = Path(out_dir).expanduser()
    fingerprint = fingerprint_inputs(files, _fingerprinted(options, recipe))
    return _warn(_prepare_files(files, out_dir, options, fingerprint, recipe, skipped, workers, shard_bytes), skipped)


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


def prepare_or_load(inputs, cache_dir, recipe: PrepareRecipe = BASE_RECIPE, workers: int | None = None, **options) -> PreparedDataset:
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
    return _warn(_prepare_files(files, out_dir, opts, fingerprint, recipe, skipped, workers), skipped)


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

    def rows_without(self, rows: np.ndarray, ids) -> np.ndarray:
        """`rows` less those holding one of the sample `ids`, by the id column only (no record is read).

        A hash lookup (pandas, which `datasets` already needs): np.isin sorts, and takes about 10 s
        for 10 M random 63-bit ids against 5 M; this takes about 1 s."""
        import pandas as pd

        return rows[~pd.Index(self.sample_ids[rows]).isin(np.asarray(ids, dtype=np.int64))]

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
