"""Readers that turn input files into validated `Record`s.

Formats are registered in `SOURCES` (`register_source`): the LucaOne pretraining CSV (or TSV), the
sequence-label CSV/TSV of LucaOne's downstream tasks, FASTA, FASTQ, Swiss-Prot flat files, Parquet
and JSON lines; the text formats also compressed with gzip (.gz), bzip2 (.bz2) or xz (.xz). A model family's
prepare recipe says which of them it reads. Every reader yields, in file order, either a `Record`
or a `RecordError` for a record that is malformed, so the caller decides whether one bad record fails the whole run
or is skipped and logged. Problems that make the whole file unreadable (missing file, wrong CSV
header, unreadable Parquet, missing required columns) are raised instead.

Every record knows where it came from (`path`, 1-based `line`, 0-based `index` within the file)
so that an error message can point at the exact line to fix.

Labels are parsed with `json.loads` or, because LucaOne writes Python dict literals, with
`ast.literal_eval`. Never with `eval`: LucaOne's own loader calls `eval()` on CSV fields, which
runs whatever code a data file contains.
"""

from __future__ import annotations

import ast
import bz2
import codecs
import collections
import csv
import gzip
import io
import json
import lzma
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from lucatrain.data import alphabet

LUCAONE_CSV_HEADER = ["obj_id", "obj_type", "obj_seq", "obj_label"]
# LucaOne's downstream-task CSVs: one sequence-level label per record (a class index or name, or a number).
SEQ_LABEL_CSV_HEADER = ["seq_id", "seq_type", "seq", "label"]

# FASTA auto-detection: a record is a gene when every letter is a nucleotide code and at least
# this fraction are A/C/G/T/U/N. Proteins made only of the letters A, C, G, T, N, ... are possible
# in principle, but a real protein is never 90% those letters.
_GENE_CORE_FRACTION = 0.9
_GENE_CORE_LETTERS = b"ACGTUN"
_GENE_LETTER_BYTES = alphabet.GENE_LETTERS.encode("ascii")

_OBJ_TYPE_WORDS = {"gene": alphabet.GENE, "prot": alphabet.PROT, "protein": alphabet.PROT}

# Rows per Parquet batch: bounds memory while amortising the per-batch cost.
_PARQUET_BATCH_ROWS = 10_000


class RecordError(ValueError):
    """A bad record or bad file; str() is 'PATH:LINE: reason' (or 'PATH: reason' when no line)."""

    def __init__(self, path, line: int | None, reason: str):
        self.path = str(path)
        self.line = line
        self.reason = reason
        where = self.path if line is None else f"{self.path}:{line}"
        super().__init__(f"{where}: {reason}")

    def __reduce__(self):
        # The default reduce would call RecordError(message), which needs three arguments;
        # pickling matters because errors may cross process boundaries (DataLoader workers).
        return (RecordError, (self.path, self.line, self.reason))


@dataclass(frozen=True)
class Record:
    """One validated sequence record."""

    obj_id: str
    """Identifier as given in the file (FASTA: first word of the header; Swiss-Prot: accession)."""
    obj_type: int
    """`alphabet.GENE` or `alphabet.PROT`."""
    seq: str
    """Residues as given (proteins upper-cased); every letter is valid for `obj_type`."""
    labels: str
    """Canonical JSON text of the label dict (sorted keys, no spaces); "{}" when none."""
    path: str
    """The file the record came from."""
    line: int
    """1-based line where the record starts (Parquet: 1-based row number)."""
    index: int
    """0-based record index within its file; bad records are counted too."""
    extra: dict = field(default_factory=dict, compare=False)
    """Fields of formats with more than the LucaOne columns (seq_label_csv: `label`, the raw text)."""


# --------------------------------------------------------------------------------------------
# Format detection and input listing


# Compressed text inputs, by suffix: each opener reads the decompressed bytes as a stream.
_COMPRESSIONS = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}


def _strip_compression(name: str) -> tuple[str, str | None]:
    """(name without a compression suffix, that suffix or None)."""
    for suffix in _COMPRESSIONS:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)], suffix
    return name, None


def _open_binary(path: Path):
    """Open a file for binary reading, transparently decompressing .gz, .bz2 and .xz."""
    _, compression = _strip_compression(path.name)
    if compression is not None:
        return _COMPRESSIONS[compression](path, "rb")
    return open(path, "rb")


def _delimiter(path: Path) -> str:
    """The field separator of a CSV-family file: a tab for .tsv (also compressed), else a comma."""
    name, _ = _strip_compression(path.name)
    return "\t" if name.lower().endswith(".tsv") else ","


def _starts_with(path: Path, prefix: bytes) -> bool:
    try:
        with _open_binary(path) as f:
            head = f.read(len(prefix) + 3)
    except (OSError, EOFError, lzma.LZMAError):  # unreadable or not really compressed: no match
        return False
    return head.removeprefix(codecs.BOM_UTF8).startswith(prefix)


# --------------------------------------------------------------------------------------------
# The source registry


@dataclass(frozen=True)
class Source:
    """An input format: its reader and the file names it claims."""

    name: str
    read: Callable[[Path, str], Iterator]
    """(path, fasta_obj_type) -> Record | RecordError per record, in file order."""
    extensions: tuple[str, ...]
    compressed_ok: bool = True
    """Whether `<name>.<ext>.gz|.bz2|.xz` is read too (text formats; Parquet compresses internally)."""
    sniff: Callable[[Path], bool] | None = None
    """For the extensions in `sniff_extensions`: does this file's start show this format?"""
    sniff_extensions: tuple[str, ...] = ()
    sniff_hint: str = ""
    """The error when no format sharing the extension recognises the file."""


SOURCES: dict[str, Source] = {}


def register_source(source: Source) -> Source:
    """Add an input format. Formats that sniff a shared extension are tried before one that claims
    it unconditionally, in registration order."""
    if source.name in SOURCES:
        raise ValueError(f"input format {source.name!r} is registered twice")
    SOURCES[source.name] = source
    return source


def formats() -> tuple[str, ...]:
    return tuple(SOURCES)


def _known_extensions() -> str:
    exts = sorted({ext for source in SOURCES.values() for ext in source.extensions})
    return ", ".join(exts) + " (text formats also as .gz, .bz2, .xz; .txt only for Swiss-Prot)"


def detect_format(path) -> str:
    """The format of `path`, from its extension (and, where formats share one, its first line)."""
    path = Path(path)
    name, compression = _strip_compression(path.name)
    ext = Path(name).suffix.lower()
    candidates = [s for s in SOURCES.values() if ext in s.extensions and (s.compressed_ok or compression is None)]
    if not candidates:
        raise RecordError(path, None, f"unknown file extension; known: {_known_extensions()}")
    sniffing = [s for s in candidates if ext in s.sniff_extensions]
    for source in sniffing:
        if source.sniff(path):
            return source.name
    for source in candidates:
        if ext not in source.sniff_extensions:
            return source.name
    raise RecordError(path, None, sniffing[0].sniff_hint)


def _looks_prepared(directory: Path) -> bool:
    # A prepared dataset (or its staging dir) holds meta.json and rejects.jsonl, which have
    # input extensions; never read those back as inputs.
    return (directory / "data.arrow").exists()


def _files_under(directory: Path, skipped: list[tuple[Path, str]], readable: tuple[str, ...] | None) -> list[Path]:
    """Input files below `directory`, recursively, sorted; hidden entries are ignored. Every other
    file (a README, label lists, an unknown format, a format not in `readable`) goes into `skipped`
    with the reason, so the caller can say what was left out."""
    found = []
    for root, dirs, files in os.walk(directory):
        root_path = Path(root)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not _looks_prepared(root_path / d)]
        for name in files:
            if name.startswith("."):
                continue
            try:
                fmt = detect_format(root_path / name)
            except RecordError as err:
                unknown = err.reason.startswith("unknown file extension")
                skipped.append((root_path / name, "not an input format" if unknown else err.reason))
                continue
            if readable is not None and fmt not in readable:
                skipped.append((root_path / name, f"{fmt}, a format this run does not read"))
                continue
            found.append(root_path / name)
    skipped.sort()
    return sorted(found)


def list_input_files(inputs, skipped: list[tuple[Path, str]] | None = None, readable: tuple[str, ...] | None = None) -> list[Path]:
    """Expand `inputs` (paths to files or directories) into the list of input files.

    Files are kept as given and in the given order; a directory is expanded recursively to its
    files with a known extension (of a format in `readable`, when given), sorted. The files of a
    directory that are left out are appended to `skipped` as (path, reason). Raises RecordError for a missing path, a directory without
    input files, or a file listed twice (it would give every record twice).
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    skipped = [] if skipped is None else skipped
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if not path.exists():
            raise RecordError(item, None, "no such file or directory")
        if path.is_dir():
            if _looks_prepared(path):
                raise RecordError(
                    path, None, "is a prepared dataset; pass it alone, not mixed with other inputs"
                )
            left_out: list[tuple[Path, str]] = []
            found = _files_under(path, left_out, readable)
            if not found:
                named = "; ".join(f"{p.name}: {why}" for p, why in left_out[:5])
                raise RecordError(
                    path, None, f"directory holds no input files; known: {_known_extensions()}"
                    + (f" (left out: {named})" if named else ""),
                )
            skipped.extend(left_out)
            files.extend(found)
        else:
            files.append(path)
    seen: dict[Path, Path] = {}
    for path in files:
        key = path.resolve()
        if key in seen:
            raise RecordError(path, None, f"listed more than once in the inputs (as {seen[key]})")
        seen[key] = path
    return files


# --------------------------------------------------------------------------------------------
# Field validation shared by all readers


def parse_labels(value) -> str:
    """Canonical JSON text of a label dict given as a dict, JSON text or a Python dict literal.

    None, "" and "{}" give "{}". Raises ValueError if the value is not a dict. Uses
    `ast.literal_eval`, which only accepts literals, never `eval`.
    """
    return json.dumps(parse_label_dict(value), sort_keys=True, separators=(",", ":"))


def parse_label_dict(value) -> dict:
    """The label dict of an `obj_label` field (see `parse_labels`); {} when empty."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text or text == "{}":
            return {}
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            # literal_eval raises several types on bad or hostile input (ValueError for a
            # function call, SyntaxError, RecursionError/MemoryError for deep nesting).
            except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
                shown = text if len(text) <= 60 else text[:57] + "..."
                raise ValueError(
                    f"unparsable obj_label {shown!r} (expected a JSON object or dict literal)"
                ) from None
    if not isinstance(value, dict):
        raise ValueError(f"obj_label must be a dict, got {type(value).__name__}")
    try:
        # Round-trip through JSON: what is stored must read back as the same plain JSON values.
        return json.loads(json.dumps(value, sort_keys=True))
    except (TypeError, ValueError) as e:  # sets, bytes, mixed-type keys, ...
        raise ValueError(f"obj_label is not JSON-serialisable: {e}") from None


def _parse_obj_type(value) -> int:
    if isinstance(value, str):
        found = _OBJ_TYPE_WORDS.get(value.strip().lower())
        if found is not None:
            return found
    elif isinstance(value, int) and not isinstance(value, bool) and value in (0, 1):
        return value
    raise ValueError(f"obj_type must be 'gene' or 'prot', got {value!r}")


def _check_seq(seq, obj_type: int) -> str:
    """The validated sequence (proteins upper-cased); raises ValueError naming a bad letter."""
    if not isinstance(seq, str):
        raise ValueError(f"sequence must be a string, got {type(seq).__name__}")
    seq = seq.strip()
    if not seq:
        raise ValueError("empty sequence")
    if obj_type == alphabet.PROT:
        seq = seq.upper()
    bad = alphabet.first_invalid_residue(seq, obj_type)
    if bad is not None:
        pos, letter = bad
        kind = "gene" if obj_type == alphabet.GENE else "prot"
        raise ValueError(f"invalid {kind} residue {letter!r} at residue {pos + 1} of {len(seq)}")
    return seq


def _check_obj_id(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"empty or missing obj_id ({value!r})")
    return value.strip()


def _make_record(path, line, index, obj_id, obj_type, seq, labels, extra=None) -> Record | RecordError:
    """Validate raw field values into a Record, or a RecordError saying what is wrong.

    Labels are parsed here (a dict, never `eval`); what they mean is checked by the model family's
    prepare recipe, which knows its tasks.
    """
    try:
        obj_id = _check_obj_id(obj_id)
        obj_type = _parse_obj_type(obj_type)
        seq = _check_seq(seq, obj_type)
        labels = parse_labels(labels)
    except ValueError as e:
        return RecordError(path, line, str(e))
    return Record(obj_id, obj_type, seq, labels, str(path), line, index, extra or {})


# --------------------------------------------------------------------------------------------
# Readers


def _decoded_lines(binary, bad_lines: list[int]) -> Iterator[str]:
    """Lines of a binary file decoded as UTF-8, one at a time.

    Decoding per line (instead of with a TextIOWrapper) tells us exactly which line holds an
    invalid byte: its number goes into `bad_lines` and the line is decoded with replacement
    characters, so the record there becomes a bad record rather than aborting the file.
    """
    for lineno, raw in enumerate(binary, 1):
        if lineno == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8) :]  # byte-order mark written by spreadsheet tools
        try:
            yield raw.decode("utf-8")
        except UnicodeDecodeError:
            bad_lines.append(lineno)
            yield raw.decode("utf-8", errors="replace")


def _bad_utf8_in(bad_lines: list[int], first: int, last: int) -> int | None:
    for lineno in bad_lines:
        if first <= lineno <= last:
            return lineno
    return None


def _iter_lucaone_csv(path: Path, fasta_obj_type: str = "auto") -> Iterator[Record | RecordError]:
    return _iter_csv(path, LUCAONE_CSV_HEADER, "LucaOne CSV")


def _iter_seq_label_csv(path: Path, fasta_obj_type: str = "auto") -> Iterator[Record | RecordError]:
    return _iter_csv(path, SEQ_LABEL_CSV_HEADER, "sequence-label CSV")


def _iter_csv(path: Path, expected_header: list[str], what: str) -> Iterator[Record | RecordError]:
    """Rows of a 4-column CSV (id, type, sequence, label) with the given header; .tsv: tab-separated."""
    # Sequences can be far longer than the csv module's default 131,072-character field limit.
    csv.field_size_limit(2**31 - 1)
    delimiter = _delimiter(path)
    if delimiter == "\t":
        what = what.replace("CSV", "TSV")
    bad_lines: list[int] = []
    with _open_binary(path) as binary:
        lines = _decoded_lines(binary, bad_lines)
        reader = csv.reader(lines, delimiter=delimiter)
        try:
            header = next(reader, None)
        except csv.Error as e:
            raise RecordError(path, 1, f"cannot parse CSV header: {e}") from None
        if header != expected_header:
            found = "empty file" if header is None else delimiter.join(header)
            raise RecordError(
                path, 1 if header is not None else None,
                f"bad {what} header {found!r}; expected {delimiter.join(expected_header)!r}",
            )  # fmt: skip
        index = 0
        end = reader.line_num
        while True:
            # A quoted field may span several lines, so a record starts on the line after the
            # one where the previous row ended, not at a fixed offset.
            start = end + 1
            try:
                row = next(reader, None)
            except csv.Error as e:
                raise RecordError(path, start, f"cannot parse CSV: {e}") from None
            if row is None:
                return
            end = reader.line_num
            if not row:
                continue  # blank line
            bad_utf8 = _bad_utf8_in(bad_lines, start, end) if bad_lines else None
            if bad_utf8 is not None:
                yield RecordError(path, start, f"line {bad_utf8} is not valid UTF-8")
            elif len(row) != len(expected_header):
                yield RecordError(path, start, f"expected {len(expected_header)} columns, found {len(row)}")
            elif expected_header is SEQ_LABEL_CSV_HEADER:
                obj_id, obj_type, seq, label = row
                yield _make_record(path, start, index, obj_id, obj_type, seq, None, {"label": label})
            else:
                yield _make_record(path, start, index, *row)
            index += 1


def guess_obj_type(seq: str) -> int:
    """GENE if `seq` looks like nucleotides (see _GENE_CORE_FRACTION), else PROT."""
    raw = seq.upper().encode("ascii", errors="replace")
    if raw.translate(None, _GENE_LETTER_BYTES):
        return alphabet.PROT  # some letter is not a nucleotide code
    core = len(raw) - len(raw.translate(None, _GENE_CORE_LETTERS))
    return alphabet.GENE if core >= _GENE_CORE_FRACTION * len(raw) else alphabet.PROT


@dataclass(frozen=True)
class FastaSpan:
    """A byte range of an uncompressed FASTA file that starts at a '>' header (or at byte 0), with the
    0-based index of its first record and the 1-based line it starts on: a piece of a large file that
    a prepare worker reads on its own, yielding exactly the records a whole-file read yields there."""

    start: int
    end: int
    first_index: int
    first_line: int


class _ByteRange(io.RawIOBase):
    """Bytes [start, end) of an open binary file, as a readable stream."""

    def __init__(self, binary, start: int, end: int):
        binary.seek(start)
        self.binary, self.left = binary, end - start

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            return 0
        view = memoryview(buffer)[: self.left]
        n = self.binary.readinto(view)
        self.left -= n
        return n


def fasta_spans(path: Path, target_bytes: int) -> list[FastaSpan]:
    """Cut an uncompressed FASTA file into spans of about `target_bytes`, each starting at a header.

    One pass over the file, counting headers ('>' at a line start) and newlines before each cut, so
    every span knows its first record's index and line without the records before it being parsed.
    """
    spans_from = [(0, 0, 1)]  # (start byte, first record index, first line) of each span
    headers = newlines = 0  # in the file bytes before `position`
    position, next_cut = 0, target_bytes
    before = b"\n"  # the byte before the block: position 0 counts as a line start
    with open(path, "rb") as f:
        if f.read(len(codecs.BOM_UTF8) + 1) == codecs.BOM_UTF8 + b">":
            headers = 1  # the first header, behind a byte-order mark rather than a newline
        f.seek(0)
        while block := f.read(16 * 2**20):
            # text[i] is file byte position - 1 + i, so b"\n>" at text index i is a header at position + i.
            text = before + block
            while next_cut < position + len(block):
                i = text.find(b"\n>", max(0, next_cut - position))
                if i < 0:
                    break  # no header in the rest of this block: look on in the next one
                cut = position + i
                if cut > spans_from[-1][0]:
                    spans_from.append((cut, headers + text[: i + 1].count(b"\n>"), newlines + block[:i].count(b"\n") + 1))
                next_cut = cut + target_bytes
            headers += text.count(b"\n>")
            newlines += block.count(b"\n")
            before = block[-1:]
            position += len(block)
    ends = [start for start, _, _ in spans_from[1:]] + [position]
    return [FastaSpan(start, end, index, line) for (start, index, line), end in zip(spans_from, ends)]


def _iter_fasta(path: Path, fasta_obj_type: str, span: FastaSpan | None = None) -> Iterator[Record | RecordError]:
    forced = None if fasta_obj_type == "auto" else _OBJ_TYPE_WORDS[fasta_obj_type]
    # SimpleFastaParser reports no line numbers. We feed it lines ourselves and note each header's
    # line: it yields a record only after reading the *next* header, so the oldest noted header
    # is always the one of the record just yielded.
    header_lines: collections.deque[int] = collections.deque()
    seen_header = False
    stray: int | None = None  # first non-blank line before the first header (the parser skips it)
    first_line = span.first_line if span else 1

    def lines(text) -> Iterator[str]:
        nonlocal seen_header, stray
        for lineno, line in enumerate(text, first_line):
            if line.startswith(">"):
                header_lines.append(lineno)
                seen_header = True
            elif not seen_header and stray is None and line.strip():
                stray = lineno
            yield line

    from Bio.SeqIO.FastaIO import SimpleFastaParser  # lazy: Biopython is slow to import

    with _open_binary(path) as binary:
        if span is not None:
            binary = io.BufferedReader(_ByteRange(binary, span.start, span.end), 2**20)
        # utf-8-sig drops a byte-order mark, which would hide the first '>'. An invalid byte
        # becomes U+FFFD, which then fails residue validation as a bad record.
        text = io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace")
        index = -1
        first_index = span.first_index if span else 0
        for index, (title, seq) in enumerate(SimpleFastaParser(lines(text)), first_index):
            line = header_lines.popleft()
            if index == 0 and stray is not None:
                yield RecordError(path, stray, "text before the first '>' header")
            obj_id = title.split(maxsplit=1)[0] if title.strip() else ""
            obj_type = forced if forced is not None else guess_obj_type(seq)
            yield _make_record(path, line, index, obj_id, obj_type, seq, None)
        if index == -1 and stray is not None:
            yield RecordError(path, stray, "no '>' header found: not a FASTA file")


class _CountedLines:
    """A text handle that counts the lines read through it (Biopython's FASTQ parser gives none)."""

    def __init__(self, text):
        self.text = text
        self.consumed = 0

    def read(self, size=-1):
        return self.text.read(size)

    def readline(self):
        line = self.text.readline()
        self.consumed += bool(line)
        return line

    def __iter__(self):
        return self

    def __next__(self):
        line = next(self.text)
        self.consumed += 1
        return line


def _iter_fastq(path: Path, fasta_obj_type: str) -> Iterator[Record | RecordError]:
    """FASTQ reads (the quality string is not used); molecule type as for FASTA (`fasta_obj_type`)."""
    from Bio.SeqIO.QualityIO import FastqGeneralIterator  # lazy: Biopython is slow to import

    forced = None if fasta_obj_type == "auto" else _OBJ_TYPE_WORDS[fasta_obj_type]
    with _open_binary(path) as binary:
        text = _CountedLines(io.TextIOWrapper(binary, encoding="utf-8-sig", errors="replace"))
        index, start = 0, 1
        try:
            for title, seq, _quality in FastqGeneralIterator(text):
                obj_id = title.split(maxsplit=1)[0] if title.strip() else ""
                obj_type = forced if forced is not None else guess_obj_type(seq)
                yield _make_record(path, start, index, obj_id, obj_type, seq, None)
                # The parser has already read the next record's '@' line: that is where it starts.
                index, start = index + 1, text.consumed
        except ValueError as err:  # the parser cannot resynchronise after a malformed record
            raise RecordError(path, start, f"malformed FASTQ record: {err}") from None


def _swissprot_record(path: Path, line: int, index: int, entry: str) -> Record | RecordError:
    from Bio import SeqIO

    try:
        parsed = SeqIO.read(io.StringIO(entry), "swiss")
    # Biopython's parser is third-party code and signals a malformed entry with several
    # exception types; any of them means this one entry is bad.
    except Exception as e:  # noqa: BLE001
        return RecordError(path, line, f"cannot parse Swiss-Prot entry: {e}")
    return _make_record(path, line, index, parsed.id, alphabet.PROT, str(parsed.seq), None)


def _iter_swissprot(path: Path, fasta_obj_type: str = "auto") -> Iterator[Record | RecordError]:
    """Swiss-Prot entries, each parsed on its own with Bio.SeqIO ("swiss").

    Splitting the file at '//' ourselves gives each entry's exact starting line and lets one
    malformed entry be reported and skipped; Bio.SeqIO.parse would stop at the first error.
    """
    bad_lines: list[int] = []
    entry: list[str] = []
    start = index = 0
    with _open_binary(path) as binary:
        for lineno, line in enumerate(_decoded_lines(binary, bad_lines), 1):
            if not entry:
                if not line.strip():
                    continue
                start = lineno
            elif line.startswith("ID   "):
                yield RecordError(path, start, "entry is not terminated by a '//' line")
                index += 1
                entry, start = [], lineno
            entry.append(line)
            if line.startswith("//"):
                bad_utf8 = _bad_utf8_in(bad_lines, start, lineno) if bad_lines else None
                if bad_utf8 is not None:
                    yield RecordError(path, start, f"line {bad_utf8} is not valid UTF-8")
                else:
                    yield _swissprot_record(path, start, index, "".join(entry))
                index += 1
                entry = []
    if entry:
        yield RecordError(path, start, "entry is not terminated by a '//' line")


def _seq_column(names: Iterable[str], path: Path, where: str) -> str:
    """The name of the sequence column: obj_seq, or seq as an alias."""
    names = set(names)
    missing = [c for c in ("obj_id", "obj_type") if c not in names]
    seq_col = "obj_seq" if "obj_seq" in names else "seq" if "seq" in names else None
    if seq_col is None:
        missing.append("obj_seq")
    if missing:
        raise RecordError(path, None, f"missing required {where} {missing} (have {sorted(names)})")
    return seq_col


def _iter_parquet(path: Path, fasta_obj_type: str = "auto") -> Iterator[Record | RecordError]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        names = parquet.schema_arrow.names
    except Exception as e:  # noqa: BLE001  (pyarrow raises several types for a bad file)
        raise RecordError(path, None, f"cannot read Parquet file: {e}") from None
    seq_col = _seq_column(names, path, "column(s)")
    columns = ["obj_id", "obj_type", seq_col] + (["obj_label"] if "obj_label" in names else [])
    index = 0
    try:
        batches = parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=columns)
        for batch in batches:
            data = batch.to_pydict()
            labels = data.get("obj_label") or [None] * batch.num_rows
            for obj_id, obj_type, seq, label in zip(
                data["obj_id"], data["obj_type"], data[seq_col], labels
            ):
                yield _make_record(path, index + 1, index, obj_id, obj_type, seq, label)
                index += 1
    except OSError as e:  # a corrupt page is only found while reading
        raise RecordError(path, index + 1, f"cannot read Parquet file: {e}") from None


def _iter_jsonl(path: Path, fasta_obj_type: str = "auto") -> Iterator[Record | RecordError]:
    bad_lines: list[int] = []
    index = 0
    with _open_binary(path) as binary:
        for lineno, line in enumerate(_decoded_lines(binary, bad_lines), 1):
            if not line.strip():
                continue
            if bad_lines and bad_lines[-1] == lineno:
                yield RecordError(path, lineno, "line is not valid UTF-8")
            else:
                yield _jsonl_record(path, lineno, index, line)
            index += 1


def _jsonl_record(path: Path, line: int, index: int, text: str) -> Record | RecordError:
    try:
        obj = json.loads(text)
    except ValueError as e:
        return RecordError(path, line, f"invalid JSON: {e}")
    if not isinstance(obj, dict):
        hint = " (.json and .jsonl inputs are JSON Lines: one object per line, not one array)" if isinstance(obj, list) else ""
        return RecordError(path, line, f"expected a JSON object, got {type(obj).__name__}{hint}")
    try:
        seq_col = _seq_column(obj.keys(), path, "key(s)")
    except RecordError as e:
        return RecordError(path, line, e.reason)
    return _make_record(
        path, line, index, obj["obj_id"], obj["obj_type"], obj[seq_col], obj.get("obj_label")
    )


def iter_records(path, fmt: str = "auto", fasta_obj_type: str = "auto", span: FastaSpan | None = None):
    """Yield a Record, or a RecordError for each bad record, for every record in `path`.

    fmt: a registered format (`formats()`), or "auto" to detect it from the extension.
    fasta_obj_type: "gene" or "prot" forces the type of every FASTA record; "auto" decides per
    record (nucleotide letters only and >= 90% A/C/G/T/U/N -> gene, else prot).
    span: only the records of that byte range of a FASTA file (`fasta_spans`).
    Raises RecordError for problems with the whole file: a missing file when called; a bad
    CSV header, an unreadable Parquet file or missing required columns when iteration starts.
    """
    if fmt != "auto" and fmt not in SOURCES:
        raise ValueError(f"unknown format {fmt!r}; choose 'auto' or one of {list(SOURCES)}")
    if fasta_obj_type not in ("auto", "gene", "prot"):
        raise ValueError(f"fasta_obj_type must be 'auto', 'gene' or 'prot', got {fasta_obj_type!r}")
    path = Path(path)
    if not path.exists():
        raise RecordError(path, None, "no such file or directory")
    if not path.is_file():
        raise RecordError(path, None, "not a regular file")
    if fmt == "auto":
        fmt = detect_format(path)
    if span is not None:
        if fmt != "fasta":
            raise ValueError(f"{path}: only FASTA files are read by byte range, this one is {fmt}")
        return _iter_fasta(path, fasta_obj_type, span)
    return SOURCES[fmt].read(path, fasta_obj_type)


# The built-in formats. `.txt` is too generic to trust: it is Swiss-Prot only when the file starts
# with an "ID   " line. `.csv`/`.tsv` is a sequence-label table when its header says so, else LucaOne's.
def _is_seq_label_table(path: Path) -> bool:
    return _starts_with(path, _delimiter(path).join(SEQ_LABEL_CSV_HEADER).encode())


register_source(Source("seq_label_csv", _iter_seq_label_csv, (".csv", ".tsv"), sniff=_is_seq_label_table,
                       sniff_extensions=(".csv", ".tsv")))  # fmt: skip
register_source(Source("lucaone_csv", _iter_lucaone_csv, (".csv", ".tsv")))
register_source(Source("fasta", _iter_fasta, (".fa", ".fasta", ".fna", ".faa", ".fas", ".ffn")))
register_source(Source("fastq", _iter_fastq, (".fastq", ".fq")))
register_source(Source("swissprot", _iter_swissprot, (".dat", ".swiss", ".sp", ".txt"), sniff=lambda p: _starts_with(p, b"ID   "),
                       sniff_extensions=(".txt",), sniff_hint="a .txt input must be a Swiss-Prot flat file starting with an 'ID   ' line"))  # fmt: skip
# BIOSCAN-5M's metadata table (processid, sampleid, phylum ... species, dna_bin, dna_barcode, split), as
# CSV, TSV or Parquet: sniffed by its columns, read by the clibd family's recipe (with an image folder).
BIOSCAN_COLUMNS = ("processid", "dna_barcode", "split")


def _table_columns(path: Path) -> set[str] | None:
    """The column names of a CSV/TSV (its header line) or Parquet table; None when it is not readable as one."""
    name, _ = _strip_compression(path.name)
    if name.lower().endswith(".parquet"):
        try:
            import pyarrow.parquet as pq

            return set(pq.ParquetFile(path).schema_arrow.names)
        except Exception:  # noqa: BLE001  (not a readable Parquet file: not this format)
            return None
    try:
        with _open_binary(path) as f:
            header = f.readline().decode("utf-8", errors="replace").removeprefix("\ufeff").strip()
    except (OSError, EOFError, lzma.LZMAError):
        return None
    return set(header.split(_delimiter(path)))


def _is_bioscan_table(path: Path) -> bool:
    names = _table_columns(path)
    return names is not None and all(column in names for column in BIOSCAN_COLUMNS)


def _iter_bioscan_table(path: Path, fasta_obj_type: str = "auto"):
    raise RecordError(path, None, "a BIOSCAN-5M metadata table is read by the clibd family (model.model_type=clibd), with "
                                  "`clibd.image_dir`")  # fmt: skip


register_source(Source("bioscan_table", _iter_bioscan_table, (".csv", ".tsv", ".parquet"), compressed_ok=False,
                       sniff=_is_bioscan_table, sniff_extensions=(".csv", ".tsv", ".parquet")))  # fmt: skip
register_source(Source("parquet", _iter_parquet, (".parquet",), compressed_ok=False))
register_source(Source("jsonl", _iter_jsonl, (".jsonl", ".json")))



def _iter_clibd_hdf5(path: Path, fasta_obj_type: str = "auto"):
    raise RecordError(path, None, "an HDF5 file in CLIBD's layout holds several splits: it is read by the clibd family "
                                  "(model.model_type=clibd), whose recipe picks the group")  # fmt: skip


register_source(Source("clibd_hdf5", _iter_clibd_hdf5, (".hdf5", ".h5"), compressed_ok=False))

# Images, one record per file (photographs, and multispectral stacks as .npy or multi-page TIFF), and
# tables of image paths (CSV/TSV/Parquet with a `path` column, optional `label`): read by the simclr
# family's recipe.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".npy")


def _iter_image(path: Path, fasta_obj_type: str = "auto"):
    raise RecordError(path, None, "an image is read by the simclr family (model.model_type=simclr)")


def _is_image_table(path: Path) -> bool:
    names = _table_columns(path)
    return names is not None and "path" in names and not all(column in names for column in BIOSCAN_COLUMNS)


def _iter_image_table(path: Path, fasta_obj_type: str = "auto"):
    raise RecordError(path, None, "a table of image paths is read by the simclr family (model.model_type=simclr)")


register_source(Source("image", _iter_image, IMAGE_EXTENSIONS, compressed_ok=False))
register_source(Source("image_table", _iter_image_table, (".csv", ".tsv", ".parquet"), compressed_ok=False,
                       sniff=_is_image_table, sniff_extensions=(".csv", ".tsv", ".parquet")))  # fmt: skip
