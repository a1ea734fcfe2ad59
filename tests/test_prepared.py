"""Tests for lucatrain.data.prepared: prepare -> load round trips, ids, policies, atomicity."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest

from lucatrain.data import alphabet
from lucatrain.data.prepared import (
    PREPARED_VERSION,
    fingerprint_inputs,
    is_prepared,
    load_prepared,
    prepare,
    prepare_or_load,
    sample_id_of,
)
from lucatrain.data.sources import Record, RecordError, iter_records

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
CSV_DEV = DATA / "lucaone_sample" / "dev" / "dev.csv"
FASTA = DATA / "rrna_genes.fasta"
SWISS = DATA / "swissprot_sample.dat"
HEADER = "obj_id,obj_type,obj_seq,obj_label\n"


def records_of(path) -> list[Record]:
    return [r for r in iter_records(path) if isinstance(r, Record)]


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


@pytest.fixture(scope="module")
def shipped(tmp_path_factory):
    """The dev CSV, the FASTA and the Swiss-Prot sample prepared once for the module."""
    out = tmp_path_factory.mktemp("prep") / "shipped"
    return prepare([CSV_DEV, FASTA, SWISS], out)


# ------------------------------------------------------------------------------------------
# Round trip


def test_prepare_round_trip_matches_sources(shipped):
    expected = records_of(CSV_DEV) + records_of(FASTA) + records_of(SWISS)
    assert len(shipped) == shipped.num_records == len(expected) == 312 + 3018 + 100
    assert shipped.sample_ids.dtype == np.int64 and shipped.sample_ids.shape == (len(expected),)
    assert shipped.obj_types.dtype == np.int8
    assert shipped.lengths.dtype == np.int32
    np.testing.assert_array_equal(shipped.obj_types, [r.obj_type for r in expected])
    np.testing.assert_array_equal(shipped.lengths, [len(r.seq) for r in expected])
    want_ids = [sample_id_of(Path(r.path).name, r.index, r.obj_id) for r in expected]
    np.testing.assert_array_equal(shipped.sample_ids, want_ids)
    assert (shipped.sample_ids >= 0).all() and len(set(want_ids)) == len(want_ids)
    assert shipped.dataset.num_rows == len(expected)
    assert shipped.dataset[0]["obj_id"] == expected[0].obj_id


def test_meta_json_counts(shipped):
    meta = json.loads((shipped.path / "meta.json").read_text())
    assert meta["version"] == PREPARED_VERSION
    assert meta["fingerprint"] == shipped.fingerprint
    assert meta["num_records"] == 3430 and meta["num_rejected"] == 0
    files = [
        (Path(f["path"]).name, f["format"], f["records"], f["rejected"])
        for f in meta["files"]
    ]
    assert files == [
        ("dev.csv", "lucaone_csv", 312, 0),
        ("rrna_genes.fasta", "fasta", 3018, 0),
        ("swissprot_sample.dat", "swissprot", 100, 0),
    ]
    assert meta["obj_type_counts"] == {"gene": 308 + 3018, "prot": 4 + 100}
    assert meta["total_residues"] == int(shipped.lengths.sum())
    assert meta["options"] == {"fmt": "auto", "fasta_obj_type": "auto", "bad_records": "fail", "duplicates": "keep"}
    assert meta["created"].endswith("Z")
    assert not (shipped.path / "rejects.jsonl").exists()


def test_rows_arbitrary_indices(shipped):
    expected = records_of(CSV_DEV) + records_of(FASTA) + records_of(SWISS)
    rng = np.random.default_rng(0)
    indices = [3429, 0, 311, 312, 0, 3429, 1700] + rng.integers(0, 3430, 50).tolist()
    rows = shipped.rows(indices)
    assert set(rows) == {"sample_id", "obj_id", "obj_type", "seq", "labels"}
    assert rows["obj_id"] == [expected[i].obj_id for i in indices]
    # A family asks for the columns it needs; sample_id always comes along.
    assert set(shipped.rows(indices, ["seq"])) == {"sample_id", "seq"}
    with pytest.raises(KeyError, match=r"no column\(s\) \['image'\]"):
        shipped.rows(indices, ["image"])
    assert rows["seq"] == [expected[i].seq for i in indices]
    assert rows["labels"] == [expected[i].labels for i in indices]
    assert rows["obj_type"] == [expected[i].obj_type for i in indices]
    assert rows["sample_id"] == shipped.sample_ids[indices].tolist()
    assert shipped.rows(np.array([], dtype=np.int64))["seq"] == []
    with pytest.raises(IndexError):
        shipped.rows([3430])
    with pytest.raises(IndexError):
        shipped.rows([-1])


def test_index_of_ids(shipped):
    rng = np.random.default_rng(1)
    positions = rng.permutation(len(shipped))[:500]
    np.testing.assert_array_equal(shipped.index_of_ids(shipped.sample_ids[positions]), positions)
    absent = np.array([0, 12345, shipped.sample_ids.max() + 1], dtype=np.int64)
    absent = absent[~np.isin(absent, shipped.sample_ids)]
    assert (shipped.index_of_ids(absent) == -1).all()
    mixed = np.array([shipped.sample_ids[5], absent[0], shipped.sample_ids[5]])
    np.testing.assert_array_equal(shipped.index_of_ids(mixed), [5, -1, 5])


def test_load_and_pickle_give_same_data(shipped):
    again = load_prepared(shipped.path)
    np.testing.assert_array_equal(again.sample_ids, shipped.sample_ids)
    assert again.fingerprint == shipped.fingerprint
    clone = pickle.loads(pickle.dumps(shipped))
    assert clone.rows([7])["seq"] == shipped.rows([7])["seq"]
    assert is_prepared(shipped.path) and not is_prepared(DATA)


# ------------------------------------------------------------------------------------------
# Stable ids and fingerprints


def test_ids_stable_across_prepares_and_moves(tmp_path, shipped):
    moved = tmp_path / "moved"
    moved.mkdir()
    for src in (CSV_DEV, FASTA, SWISS):
        shutil.copy(src, moved / src.name)
    files = [moved / "dev.csv", moved / "rrna_genes.fasta", moved / "swissprot_sample.dat"]
    again = prepare(files, tmp_path / "again")
    np.testing.assert_array_equal(again.sample_ids, shipped.sample_ids)
    assert again.fingerprint == shipped.fingerprint  # only names and contents count


def test_adding_a_file_keeps_existing_ids(tmp_path, shipped):
    extra = tmp_path / "extra.fa"
    extra.write_text(">new1\nACGTACGT\n>new2\nMKVLAAGI\n")
    grown = prepare([extra, CSV_DEV, FASTA, SWISS], tmp_path / "grown")
    assert len(grown) == len(shipped) + 2
    # Every old id is still there, on the same record.
    positions = grown.index_of_ids(shipped.sample_ids)
    assert (positions >= 0).all()
    some = np.arange(0, len(shipped), 97)
    assert grown.rows(positions[some])["seq"] == shipped.rows(some)["seq"]
    assert grown.fingerprint != shipped.fingerprint


def test_sample_id_definition():
    # Pinned independently of the implementation: resumed runs compare ids across versions.
    digest = hashlib.blake2b(b"train.csv\x0042\x00gene_X1").digest()
    want = int.from_bytes(digest[:8], "big") & (2**63 - 1)
    assert sample_id_of("train.csv", 42, "gene_X1") == want
    assert sample_id_of("train.csv", 43, "gene_X1") != sample_id_of("train.csv", 42, "gene_X1")


def test_repeated_obj_id_in_one_file_gets_distinct_ids(tmp_path):
    f = tmp_path / "rep.fa"
    f.write_text(">x first\nACGT\n>x again\nACGT\n")
    ds = prepare([f], tmp_path / "ds")
    want = [sample_id_of("rep.fa", 0, "x"), sample_id_of("rep.fa", 1, "x")]
    assert ds.sample_ids.tolist() == want


def test_fingerprint_changes_with_content_and_options(tmp_path):
    f = tmp_path / "a.fa"
    f.write_text(">x\nACGT\n")
    base = fingerprint_inputs([f], {"fmt": "auto"})
    assert len(base) == 64 and base == fingerprint_inputs([f], {"fmt": "auto"})
    assert fingerprint_inputs([f], {"fmt": "fasta"}) != base
    f.write_text(">x\nACGA\n")  # same size, different bytes
    assert fingerprint_inputs([f], {"fmt": "auto"}) != base


def test_prepare_or_load_reuses_cache_and_rebuilds_on_change(tmp_path):
    f = tmp_path / "in" / "a.fa"
    f.parent.mkdir()
    f.write_text(">x\nACGT\n>y\nMKV\n")
    cache = tmp_path / "cache"
    first = prepare_or_load([f], cache)
    assert first.path.parent == cache and first.path.name == first.fingerprint[:16]
    stamp = (first.path / "data.arrow").stat().st_mtime_ns
    second = prepare_or_load([f], cache, fmt="auto")  # defaults spelled out: same fingerprint
    assert second.path == first.path
    assert (second.path / "data.arrow").stat().st_mtime_ns == stamp  # reused, not rewritten
    # A prepared directory given alone is loaded as it is.
    assert prepare_or_load(first.path, tmp_path / "other_cache").path == first.path
    assert not (tmp_path / "other_cache").exists()
    f.write_text(">x\nACGT\n>y\nMKV\n>z\nGGG\n")
    third = prepare_or_load([f], cache)
    assert third.path != first.path and len(third) == 3
    assert sorted(p.name for p in cache.iterdir()) == sorted([first.path.name, third.path.name])


# ------------------------------------------------------------------------------------------
# Bad-record policies and atomicity

BAD_CSV = HEADER + "\n".join(
    [
        "g1,gene,ACGT,{}",  # 2
        "g2,gene,ACGT",  # 3: 3 columns
        "g3,gene,AC7T,{}",  # 4: bad residue
        "g4,gene,,{}",  # 5: empty
        "g5,gene,ACGT,{'a': }",  # 6: bad label
        "p1,prot,MKV,{'seq_level': {'prot_taxonomy': 1}}",  # 7
    ]
) + "\n"


def test_fail_policy_raises_first_error_and_leaves_nothing(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "bad.csv").write_text(BAD_CSV)
    out = tmp_path / "out" / "ds"
    with pytest.raises(RecordError) as info:
        prepare([src], out)
    assert str(info.value) == f"{src / 'bad.csv'}:3: expected 4 columns, found 3"
    assert not out.exists()
    assert leftovers(out.parent) == []  # no staging directory left either


def test_skip_policy_writes_rejects(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text(BAD_CSV)
    ds = prepare([bad], tmp_path / "ds", bad_records="skip")
    assert len(ds) == 2
    assert ds.rows([0, 1])["seq"] == ["ACGT", "MKV"]
    assert ds.rows([1])["labels"] == ['{"seq_level":{"prot_taxonomy":1}}']
    rejects = [json.loads(x) for x in (ds.path / "rejects.jsonl").read_text().splitlines()]
    assert [(r["path"], r["line"]) for r in rejects] == [(str(bad), n) for n in (3, 4, 5, 6)]
    assert rejects[1]["reason"] == "invalid gene residue '7' at residue 3 of 4"
    meta = ds.meta
    assert meta["num_records"] == 2 and meta["num_rejected"] == 4
    assert meta["files"][0]["records"] == 2 and meta["files"][0]["rejected"] == 4
    assert meta["obj_type_counts"] == {"gene": 1, "prot": 1}
    # ids count bad records too: p1 is the 6th record (index 5) of its file.
    assert ds.sample_ids[1] == sample_id_of("bad.csv", 5, "p1")


def test_unknown_policy_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"\('fail', 'skip'\)"):
        prepare([CSV_DEV], tmp_path / "x", bad_records="ignore")
    assert not (tmp_path / "x").exists()


def test_empty_result_is_an_error(tmp_path):
    only_bad = tmp_path / "only_bad.csv"
    only_bad.write_text(HEADER + "g1,gene,,{}\n")
    with pytest.raises(ValueError, match="no records"):
        prepare([only_bad], tmp_path / "ds", bad_records="skip")
    assert leftovers(tmp_path) == ["only_bad.csv"]


def test_duplicate_sample_ids_name_both_records(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "same.fa").write_text(">x\nACGT\n>y\nACGA\n")
    with pytest.raises(ValueError, match="duplicate sample_id") as info:
        prepare([tmp_path / "a", tmp_path / "b"], tmp_path / "ds")
    msg = str(info.value)
    assert f"{tmp_path / 'a' / 'same.fa'}:1 (obj_id 'x')" in msg
    assert f"{tmp_path / 'b' / 'same.fa'}:1 (obj_id 'x')" in msg
    assert not (tmp_path / "ds").exists()


def test_missing_input_and_existing_output(tmp_path):
    with pytest.raises(RecordError, match="no such file or directory"):
        prepare([tmp_path / "nope.csv"], tmp_path / "ds")
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("user data")
    with pytest.raises(ValueError, match="not empty"):
        prepare([CSV_DEV], busy)
    assert leftovers(busy) == ["keep.txt"]


def test_load_prepared_errors_name_the_path(tmp_path, shipped):
    copy = tmp_path / "copy"
    shutil.copytree(shipped.path, copy)
    (copy / "meta.json").write_text("{not json")
    with pytest.raises(ValueError, match=str(copy / "meta.json")):
        load_prepared(copy)
    assert not is_prepared(copy)

    shutil.copy(shipped.path / "meta.json", copy / "meta.json")
    data = (copy / "data.arrow").read_bytes()
    (copy / "data.arrow").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match=str(copy / "data.arrow")):
        load_prepared(copy)

    (copy / "data.arrow").unlink()
    with pytest.raises(ValueError, match=f"{copy} is not a prepared dataset: data.arrow"):
        load_prepared(copy)


# ------------------------------------------------------------------------------------------
# Scale


def test_200k_record_fasta(tmp_path):
    n = 200_000
    rng = np.random.default_rng(2)
    lengths = rng.integers(20, 60, n)
    letters = np.frombuffer(b"ACGT", dtype=np.uint8)[rng.integers(0, 4, int(lengths.sum()))]
    seqs = np.split(letters, np.cumsum(lengths)[:-1])
    path = tmp_path / "synthetic.fa"
    with open(path, "wb") as f:
        f.writelines(b">r%d\n%s\n" % (i, s.tobytes()) for i, s in enumerate(seqs))

    ds = prepare([path], tmp_path / "ds")
    assert len(ds) == n
    np.testing.assert_array_equal(ds.lengths, lengths)
    assert (ds.obj_types == alphabet.GENE).all()
    assert np.unique(ds.sample_ids).size == n
    picks = [n - 1, 0, 123_456, 99_999]
    assert ds.rows(picks)["seq"] == [seqs[i].tobytes().decode() for i in picks]
    assert ds.index_of_ids([sample_id_of("synthetic.fa", 123_456, "r123456")]).tolist() == [123_456]


def test_a_registered_source_and_a_family_schema_with_blobs_vectors_and_modality_masks(tmp_path):
    """The data layer is not LucaOne's alone: a new format plugs into the registry, and a family's schema
    may hold binary blobs (encoded images), float vectors and nullable modalities with per-sample masks."""
    import io

    from PIL import Image

    from lucatrain.data.schema import Column, PrepareRecipe, Schema
    from lucatrain.data.sources import SOURCES, Record, Source, detect_format, register_source

    def png(value: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("RGB", (4, 4), (value, 0, 0)).save(buffer, format="PNG")
        return buffer.getvalue()

    def read_specimens(path, fasta_obj_type="auto"):
        for index, line in enumerate(path.read_text().splitlines()):
            obj_id, barcode, has_image = line.split("\t")
            image = png(index * 40) if has_image == "1" else None
            yield Record(obj_id, 0, barcode, "{}", str(path), index + 1, index, {"image": image, "size": [index, 0.5]})

    class SpecimenRecipe(PrepareRecipe):
        name = "specimens"
        formats = ("specimen_tsv",)
        schema = Schema((Column("obj_id", "string"), Column("barcode", "string"), Column("image", "binary"),
                         Column("size", "float_vector")), modalities=("image",))  # fmt: skip

        def row(self, record):
            return {"obj_id": record.obj_id, "barcode": record.seq, "image": record.extra["image"], "size": record.extra["size"]}

    register_source(Source("specimen_tsv", read_specimens, (".specimens",)))
    try:
        path = tmp_path / "batch.specimens"
        path.write_text("BIOUG1\tACGTACGT\t1\nBIOUG2\tACGGT\t0\nBIOUG3\tAACGT\t1\n")
        assert detect_format(path) == "specimen_tsv"
        data = prepare([path], tmp_path / "prepared", recipe=SpecimenRecipe())
        assert data.recipe == "specimens" and data.obj_types is None
        np.testing.assert_array_equal(data.present("image"), [True, False, True])  # the modality mask
        rows = data.rows([2, 1], ["image", "size"])
        assert set(rows) == {"sample_id", "image", "size"}
        assert rows["image"][1] is None and Image.open(io.BytesIO(rows["image"][0])).getpixel((0, 0)) == (80, 0, 0)
        assert rows["size"][0] == [2.0, 0.5]
        np.testing.assert_array_equal(data.lengths, [8, 5, 5])
        # Reloaded from disk, the schema comes from meta.json.
        again = load_prepared(data.path)
        assert again.schema == SpecimenRecipe.schema and again.rows([0], ["barcode"])["barcode"] == ["ACGTACGT"]
        # The LucaOne recipe refuses the format by name instead of guessing.
        from lucatrain.families.lucaone import LUCAONE_RECIPE

        with pytest.raises(RecordError, match="is specimen_tsv, which the lucaone recipe does not read"):
            prepare([path], tmp_path / "other", recipe=LUCAONE_RECIPE)
    finally:
        SOURCES.pop("specimen_tsv")
