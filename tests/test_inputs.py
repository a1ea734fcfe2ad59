"""Inputs are never left out or mis-typed silently (issue 9, item 5): more formats (TSV, FASTQ,
bz2/xz compression), skipped files named, duplicate obj_ids counted with a policy, nucleotide
records typed `prot` flagged, and what truncation cuts counted."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import lzma
from pathlib import Path

import numpy as np
import pytest

from lucatrain.data import alphabet
from lucatrain.data.batching import truncation_summary
from lucatrain.data.prepared import prepare, prepare_or_load, warnings_of
from lucatrain.data.sources import Record, RecordError, detect_format, iter_records, list_input_files
from lucatrain.families.lucaone.labels import encode_labels, spans_cut

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
FASTA = DATA / "rrna_genes.fasta"
HEADER = "obj_id,obj_type,obj_seq,obj_label\n"


@pytest.fixture
def warned(caplog):
    """The lucatrain logger's warnings (it does not propagate to the root logger once a run set it up)."""
    logger = logging.getLogger("lucatrain")
    logger.addHandler(caplog.handler)
    level, propagate = logger.level, logger.propagate
    logger.setLevel(logging.WARNING)
    logger.propagate = False  # caplog's handler also sits on the root logger: each record once

    def messages() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]

    yield messages
    logger.removeHandler(caplog.handler)
    logger.setLevel(level)
    logger.propagate = propagate


def good(path) -> list[Record]:
    return [r for r in iter_records(path) if isinstance(r, Record)]


# ------------------------------------------------------------------ formats


def test_tsv_reads_like_the_csv_of_the_same_records(tmp_path):
    csv_path, tsv_path = tmp_path / "a.csv", tmp_path / "a.tsv"
    rows = [("g1", "gene", "ACGTN", "{}"), ("p1", "prot", "MKVL", '{"seq_level": {"prot_taxonomy": 1}}')]
    csv_path.write_text(HEADER + "".join(f'{i},{t},{s},"{lab.replace(chr(34), chr(34) * 2)}"\n' for i, t, s, lab in rows))
    tsv_path.write_text(HEADER.replace(",", "\t") + "".join("\t".join(r) + "\n" for r in rows))
    assert detect_format(tsv_path) == "lucaone_csv"
    as_csv, as_tsv = good(csv_path), good(tsv_path)
    assert [(r.obj_id, r.obj_type, r.seq, r.labels, r.line) for r in as_tsv] == [
        (r.obj_id, r.obj_type, r.seq, r.labels, r.line) for r in as_csv
    ]
    assert as_tsv[1].labels == '{"seq_level":{"prot_taxonomy":1}}'


def test_a_tsv_with_a_comma_header_names_the_expected_tab_header(tmp_path):
    path = tmp_path / "a.tsv"
    path.write_text(HEADER + "g,gene,ACGT,{}\n")
    with pytest.raises(RecordError, match=r"a\.tsv:1: bad LucaOne TSV header .*expected 'obj_id\\tobj_type"):
        list(iter_records(path))


def test_seq_label_tsv_is_sniffed(tmp_path):
    path = tmp_path / "t.tsv"
    path.write_text("seq_id\tseq_type\tseq\tlabel\nq1\tprot\tMKV\t2\n")
    assert detect_format(path) == "seq_label_csv"
    assert good(path)[0].extra == {"label": "2"}


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_inputs_read_as_their_plain_text(tmp_path, suffix, opener):
    plain = FASTA.read_text()
    packed = tmp_path / f"rrna.fasta{suffix}"
    with opener(packed, "wt") as f:
        f.write(plain)
    assert detect_format(packed) == "fasta"
    assert [(r.obj_id, r.seq, r.line) for r in good(packed)] == [(r.obj_id, r.seq, r.line) for r in good(FASTA)]


def test_parquet_is_not_claimed_compressed(tmp_path):
    path = tmp_path / "x.parquet.bz2"
    path.write_bytes(b"")
    with pytest.raises(RecordError, match="unknown file extension"):
        detect_format(path)


def test_fastq_records_with_their_start_lines(tmp_path):
    path = tmp_path / "reads.fastq"
    # r2 has its sequence and quality wrapped over two lines, and a quality line starting with '@'.
    path.write_text("@r1 first read\nACGTACGT\n+\nIIIIIIII\n@r2\nACGG\nTT\n+\n@III\nII\n@r3\nMKVL\n+r3\nIIII\n")
    records = good(path)
    assert [(r.obj_id, r.seq, r.line, r.index) for r in records] == [
        ("r1", "ACGTACGT", 1, 0), ("r2", "ACGGTT", 5, 1), ("r3", "MKVL", 11, 2)
    ]
    assert [r.obj_type for r in records] == [alphabet.GENE, alphabet.GENE, alphabet.PROT]  # detected as for FASTA
    forced = [r.obj_type for r in iter_records(path, fasta_obj_type="gene") if isinstance(r, Record)]
    assert forced[:2] == [alphabet.GENE] * 2


def test_a_malformed_fastq_names_the_record_line(tmp_path):
    path = tmp_path / "bad.fq"
    path.write_text("@r1\nACGT\n+\nIIII\n@r2\nACGT\n+\nII\n")
    with pytest.raises(RecordError, match=r"bad\.fq:5: malformed FASTQ record: .*r2"):
        list(iter_records(path))


def test_fastq_trains_with_the_lucaone_recipe(tmp_path):
    from lucatrain.families.lucaone.family import LUCAONE_RECIPE

    path = tmp_path / "reads.fq.gz"
    with gzip.open(path, "wt") as f:
        f.write("@a\nACGT\n+\nIIII\n@b\nACGA\n+\nIIII\n")
    data = prepare([path], tmp_path / "ds", recipe=LUCAONE_RECIPE)
    assert data.num_records == 2 and data.meta["files"][0]["format"] == "fastq"


# ------------------------------------------------------------------ files left out


def test_every_skipped_file_of_a_directory_is_named(tmp_path, warned):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "a.fasta").write_text(">x\nACGT\n")
    (inputs / "README.md").write_text("about")
    (inputs / "sub" / "notes.txt").write_text("not swiss-prot")
    (inputs / "sub" / "reads.sam").write_text("@HD\n")
    (inputs / ".hidden.fa").write_text(">h\nACGT\n")
    skipped = []
    assert list_input_files([inputs], skipped) == [inputs / "a.fasta"]
    assert [(p.name, why) for p, why in skipped] == [
        ("README.md", "not an input format"),
        ("notes.txt", "a .txt input must be a Swiss-Prot flat file starting with an 'ID   ' line"),
        ("reads.sam", "not an input format"),
    ]
    data = prepare([inputs], tmp_path / "ds")
    assert [item["path"] for item in data.meta["skipped_files"]] == [str(p) for p, _ in skipped]
    said = [m for m in warned() if "not read" in m]
    assert len(said) == 1 and "3 file(s)" in said[0] and "reads.sam (not an input format)" in said[0]
    # A cached dataset says it again on every later run.
    prepare_or_load([inputs], tmp_path / "cache")
    prepare_or_load([inputs], tmp_path / "cache")
    assert sum("3 file(s)" in m for m in warned()) == 3


def test_a_directory_with_no_inputs_names_what_it_holds(tmp_path):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "reads.sam").write_text("x")
    with pytest.raises(RecordError, match=r"holds no input files.*left out: reads\.sam: not an input format"):
        list_input_files([tmp_path / "d"])


# ------------------------------------------------------------------ duplicate obj_ids


def _with_duplicates(tmp_path) -> Path:
    inputs = tmp_path / "in"
    inputs.mkdir()
    (inputs / "a.csv").write_text(HEADER + "x1,gene,ACGT,{}\nx2,gene,ACGA,{}\nx1,gene,ACGG,{}\n")
    (inputs / "b.csv").write_text(HEADER + "x2,gene,AAAA,{}\nx3,gene,CCCC,{}\n")
    return inputs


def test_duplicates_keep_trains_each_copy_and_says_so(tmp_path, warned):
    inputs = _with_duplicates(tmp_path)
    data = prepare([inputs], tmp_path / "ds")
    assert data.num_records == 5
    dup = data.meta["duplicate_obj_ids"]
    assert (dup["policy"], dup["records"], dup["ids"]) == ("keep", 2, 2)
    assert dup["examples"][0] == f"{inputs / 'a.csv'}:4 (obj_id 'x1') repeats {inputs / 'a.csv'}:2 (obj_id 'x1')"
    assert dup["examples"][1].startswith(f"{inputs / 'b.csv'}:2 (obj_id 'x2') repeats {inputs / 'a.csv'}:3")
    assert any("2 record(s) repeat the obj_id" in m for m in warned())


def test_duplicates_drop_keeps_the_first_copy(tmp_path):
    inputs = _with_duplicates(tmp_path)
    kept = prepare([inputs], tmp_path / "keep")
    dropped = prepare([inputs], tmp_path / "drop", duplicates="drop")
    rows = dropped.rows(range(dropped.num_records), ["obj_id", "seq"])
    assert list(zip(rows["obj_id"], rows["seq"])) == [("x1", "ACGT"), ("x2", "ACGA"), ("x3", "CCCC")]
    assert dropped.meta["duplicate_obj_ids"]["records"] == 2
    assert dropped.meta["files"][0]["records"] == 2 and dropped.meta["obj_type_counts"]["gene"] == 3
    assert dropped.fingerprint != kept.fingerprint  # other rows, so another sample order
    # The kept rows keep their sample ids: a run can switch to drop and still find what it has seen.
    assert set(dropped.sample_ids) <= set(kept.sample_ids)


def test_duplicates_fail_names_both_records(tmp_path):
    inputs = _with_duplicates(tmp_path)
    with pytest.raises(ValueError, match=r"duplicate obj_id: .*a\.csv:4 \(obj_id 'x1'\) repeats .*a\.csv:2 .*2 record\(s\)"):
        prepare([inputs], tmp_path / "ds", duplicates="fail")
    assert not (tmp_path / "ds").exists()
    # 'keep' and 'fail' store the same rows (one cache entry); a cached 'keep' dataset is refused under 'fail'.
    cached = prepare_or_load([inputs], tmp_path / "cache")
    with pytest.raises(ValueError, match="duplicate obj_id"):
        prepare_or_load([inputs], tmp_path / "cache", duplicates="fail")
    assert cached.meta["options"]["duplicates"] == "keep"


def test_no_duplicates_no_warning_and_the_fingerprint_of_before(tmp_path, warned):
    data = prepare([FASTA], tmp_path / "ds")
    assert warnings_of(data) == [] and warned() == []
    # The option did not exist before: with 'keep' the fingerprint (hence the order) is the old one.
    assert data.fingerprint == prepare([FASTA], tmp_path / "ds2", duplicates="fail").fingerprint


def test_config_refuses_an_unknown_duplicates_policy():
    from lucatrain.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"`data.duplicates` must be one of \['keep', 'drop', 'fail'\]"):
        load_config(None, ["data.duplicates=ignore"])


# ------------------------------------------------------------------ mis-typed records


def test_nucleotide_records_typed_prot_are_flagged(tmp_path, warned):
    path = tmp_path / "a.csv"
    path.write_text(HEADER + "p1,prot,MKVLAAG,{}\np2,prot,ACGTACGTTA,{}\ng1,gene,ACGT,{}\np3,prot,acgtnacgu,{}\n")
    data = prepare([path], tmp_path / "ds")
    flagged = data.meta["prot_like_nucleotides"]
    assert flagged["records"] == 2
    assert flagged["examples"] == [f"{path}:3 (obj_id 'p2')", f"{path}:5 (obj_id 'p3')"]
    assert any("2 record(s) typed prot consist of nucleotide letters" in m for m in warned())


# ------------------------------------------------------------------ truncation


def test_truncation_summary_counts_records_and_residues():
    lengths = np.array([10, 1024, 1025, 3000])
    line = truncation_summary(lengths, 1026, "right")
    assert line.startswith("2 of 4 records (50.0%) are longer than data.max_length=1026")
    assert "cut at the end (data.truncation=right): 1,977 of 5,059 residues (39.1%)" in line
    assert "cut at the start" in truncation_summary(lengths, 1026, "left")
    assert truncation_summary(lengths, 4000, "right") is None


@pytest.mark.parametrize("truncation", ["right", "left"])
def test_spans_cut_agrees_with_the_label_encoder(truncation):
    spans = [[0, 1, 1], [2, 5, 2], [6, 7, 3], [8, 9, 4]]  # residues 0..9
    texts = [json.dumps({"span_level": {"prot_site": spans}})]
    max_length = 6 + 2  # keeps 6 of the 10 residues
    dropped, clipped = spans_cut(texts, [10], max_length, truncation, ["prot_site", "prot_mask"])["prot_site"]
    # What the encoder puts on the tokens: each span's label index, once per span that survives.
    cut = 4 if truncation == "left" else 0
    encoded = encode_labels(texts, ["prot_site"], {"prot_site": 5}, np.array([6]), np.array([cut]), 8)["prot_site_labels"][0]
    surviving = set(encoded[encoded >= 0].tolist())
    assert dropped == len(spans) - len(surviving)
    if truncation == "right":
        assert (dropped, clipped) == (2, 0)  # [6,7] and [8,9] fall past residue 5; [2,5] ends exactly there
    else:
        assert (dropped, clipped) == (1, 1)  # the first 4 residues go: [0,1] dropped, [2,5] clipped to [4,5]
    assert spans_cut(texts, [10], 12, truncation, ["prot_site"]) == {}
