"""What a prepared dataset holds: a family's columns (its Schema) and how records become rows (its recipe).

Every prepared dataset has two columns of its own, `sample_id` (int64, first) and `length` (int32,
last: what batching by tokens reads). Between them come the family's columns, each of one kind:

    string, large_string      text (large_string: 64-bit offsets, for long sequences)
    int8, int32, int          integers
    float                     a float64 scalar (e.g. a regression label)
    float_vector              a list of float32 (e.g. a precomputed embedding)
    binary                    bytes (e.g. an encoded JPEG)
    bool

A column named in `modalities` may be null for a sample (a specimen without an image); prepare then
derives a `<column>_present` bool column, the per-sample modality mask, so a batch can tell which
samples carry the modality without reading it.

A `PrepareRecipe` turns one source record into one row (raising ValueError for a record it cannot use,
which prepare reports as `file:line: reason` under the `data.bad_records` policy) and may collect
statistics for meta.json. The base recipe stores gene/protein sequence records as they are read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

ARROW_KINDS = {
    "string": pa.string(),
    "large_string": pa.large_string(),
    "int8": pa.int8(),
    "int32": pa.int32(),
    "int": pa.int64(),
    "float": pa.float64(),
    "float_vector": pa.list_(pa.float32()),
    "binary": pa.large_binary(),
    "bool": pa.bool_(),
}
CORE_FIRST, CORE_LAST = ("sample_id", "int"), ("length", "int32")


@dataclass(frozen=True)
class Column:
    name: str
    kind: str

    def __post_init__(self):
        if self.kind not in ARROW_KINDS:
            raise ValueError(f"column {self.name!r}: unknown kind {self.kind!r}; kinds are {list(ARROW_KINDS)}")


@dataclass(frozen=True)
class Schema:
    columns: tuple[Column, ...]
    modalities: tuple[str, ...] = ()

    def __post_init__(self):
        names = [c.name for c in self.columns]
        for reserved in (CORE_FIRST[0], CORE_LAST[0]):
            if reserved in names:
                raise ValueError(f"column {reserved!r} is added by prepare itself")
        for modality in self.modalities:
            if modality not in names:
                raise ValueError(f"modality {modality!r} is not a column of {names}")

    @property
    def all_columns(self) -> list[Column]:
        """sample_id, the family's columns, one `<modality>_present` mask per modality, length."""
        masks = [Column(f"{m}_present", "bool") for m in self.modalities]
        return [Column(*CORE_FIRST), *self.columns, *masks, Column(*CORE_LAST)]

    def arrow(self) -> pa.Schema:
        return pa.schema([(c.name, ARROW_KINDS[c.kind]) for c in self.all_columns])

    def to_json(self) -> dict:
        return {"columns": [[c.name, c.kind] for c in self.columns], "modalities": list(self.modalities)}

    @classmethod
    def from_json(cls, data: dict) -> "Schema":
        return cls(tuple(Column(name, kind) for name, kind in data["columns"]), tuple(data.get("modalities", ())))


SEQUENCE_SCHEMA = Schema(
    (Column("obj_id", "string"), Column("obj_type", "int8"), Column("seq", "large_string"), Column("labels", "string"))
)


class PrepareRecipe:
    """Records -> rows of `schema`. Subclasses check records against what their family needs."""

    name = "sequences"
    schema = SEQUENCE_SCHEMA
    formats: tuple[str, ...] | None = None
    """Input formats this recipe reads (None: all); another format is an error naming the file."""

    def fingerprint_options(self) -> dict:
        """What enters the dataset fingerprint besides the files and reading options (so datasets
        prepared by different recipes from the same files never share a cache entry)."""
        return {"recipe": self.name}

    def start(self) -> None:
        """Called once before the first record of a prepare."""

    def row(self, record) -> dict:
        """The column values of one record (raise ValueError for a record this recipe cannot use)."""
        return {"obj_id": record.obj_id, "obj_type": record.obj_type, "seq": record.seq, "labels": record.labels}

    def read(self, path, fmt: str, fasta_obj_type: str):
        """The records of one input file (`Record` or `RecordError` each): the format's reader. A recipe
        may read a file itself, e.g. one group of an HDF5 file that holds several splits."""
        from lucatrain.data.sources import iter_records

        return iter_records(path, fmt, fasta_obj_type)

    def length(self, record) -> int:
        """The `length` column: what token-budget batching and the ledger's token count read."""
        return len(record.seq)

    def meta(self) -> dict:
        """Extra entries for meta.json, after the last record (of one shard: see `merge_meta`)."""
        return {}

    def merge_meta(self, parts: list[dict]) -> dict:
        """The dataset's `meta` from its shards' (each shard is prepared from a fresh `start()`, in
        input order). By default every shard must report the same: a recipe whose meta sums or
        collects over records overrides this."""
        for part in parts[1:]:
            if part != parts[0]:
                raise AssertionError(f"recipe {self.name}: shards report different meta ({parts[0]} and {part}); "
                                     "it must override merge_meta")  # fmt: skip
        return parts[0] if parts else self.meta()
