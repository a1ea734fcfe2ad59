"""Tests for lucatrain.data.sources: every reader, on the shipped real data and on bad inputs."""

from __future__ import annotations

import builtins
import csv
import gzip
import json
import pickle
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lucatrain.data import alphabet
from lucatrain.data.sources import (
    Record,
    RecordError,
    detect_format,
    iter_records,
    list_input_files,
    parse_labels,
)

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"
SAMPLE = DATA / "lucaone_sample"
HEADER = "obj_id,obj_type,obj_seq,obj_label\n"


def split(items):
    """(records, errors) of an iter_records stream."""
    records = [x for x in items if isinstance(x, Record)]
    errors = [x for x in items if isinstance(x, RecordError)]
    assert len(records) + len(errors) == len(items)
    return records, errors


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def only_error(path: Path, **kwargs) -> RecordError:
    records, errors = split(list(iter_records(path, **kwargs)))
    assert len(errors) == 1, errors
    return errors[0]


# ------------------------------------------------------------------------------------------
# Shipped real data


@pytest.mark.parametrize(
    "split_name, rows, genes, prots",
    [("train", 2494, 2411, 83), ("dev", 312, 308, 4), ("test", 312, 299, 13)],
)
def test_shipped_lucaone_csv_counts(split_name, rows, genes, prots):
    path = SAMPLE / split_name / f"{split_name}.csv"
    with open(path, newline="") as f:
        truth = list(csv.reader(f))[1:]  # ground truth from the csv module, header dropped
    assert len(truth) == rows
    records, errors = split(list(iter_records(path)))
    assert errors == []
    assert len(records) == rows
    assert sum(r.obj_type == alphabet.GENE for r in records) == genes
    assert sum(r.obj_type == alphabet.PROT for r in records) == prots
    # One record per line here (no multi-line fields): record i starts on line i + 2.
    assert [r.line for r in records] == list(range(2, rows + 2))
    assert [r.index for r in records] == list(range(rows))
    assert [r.obj_id for r in records] == [row[0] for row in truth]
    want = [row[2].upper() if row[1] == "prot" else row[2] for row in truth]
    assert [r.seq for r in records] == want


def test_shipped_csv_labels_are_canonical_json():
    records, _ = split(list(iter_records(SAMPLE / "train" / "train.csv")))
    prot = next(r for r in records if r.obj_type == alphabet.PROT)
    labels = json.loads(prot.labels)
    assert isinstance(labels["seq_level"]["prot_taxonomy"], int)
    assert prot.labels == json.dumps(labels, sort_keys=True, separators=(",", ":"))
    assert sum(r.labels == "{}" for r in records) > 0


def test_shipped_fasta_all_genes_with_header_lines():
    path = DATA / "rrna_genes.fasta"
    lines = path.read_text().splitlines()
    header_lines = [i + 1 for i, line in enumerate(lines) if line.startswith(">")]
    first_words = [lines[i - 1][1:].split()[0] for i in header_lines]
    records, errors = split(list(iter_records(path)))
    assert errors == []
    assert len(records) == 3018
    assert all(r.obj_type == alphabet.GENE for r in records)
    assert [r.line for r in records] == header_lines
    assert [r.obj_id for r in records] == first_words
    assert records[0].obj_id == "gene_15896971_871672-873167_0"
    assert all(r.labels == "{}" for r in records)


def test_shipped_swissprot_all_proteins_with_id_lines():
    path = DATA / "swissprot_sample.dat"
    lines = path.read_text().splitlines()
    id_lines = [i + 1 for i, line in enumerate(lines) if line.startswith("ID   ")]
    records, errors = split(list(iter_records(path)))
    assert errors == []
    assert len(records) == 100
    assert all(r.obj_type == alphabet.PROT for r in records)
    assert [r.line for r in records] == id_lines
    first = records[0]
    assert first.obj_id == "P15455"  # first accession of the AC line, not the entry name
    assert len(first.seq) == 472  # "ID   CRU4_ARATH ... 472 AA."
    # Entry-by-entry parsing agrees with Biopython parsing the whole file in one go.
    from Bio import SeqIO

    with open(path) as f:
        whole = list(SeqIO.parse(f, "swiss"))
    assert [(r.obj_id, r.seq) for r in records] == [(w.id, str(w.seq)) for w in whole]


# ------------------------------------------------------------------------------------------
# Format detection and input listing


@pytest.mark.parametrize(
    "name, fmt",
    [
        ("a.csv", "lucaone_csv"), ("a.fa", "fasta"), ("a.fasta.gz", "fasta"), ("a.FNA", "fasta"),
        ("a.faa", "fasta"), ("a.fas", "fasta"), ("a.ffn", "fasta"), ("a.dat", "swissprot"),
        ("a.swiss", "swissprot"), ("a.sp", "swissprot"), ("a.parquet", "parquet"),
        ("a.jsonl", "jsonl"), ("a.json", "jsonl"),
    ],
)  # fmt: skip
def test_detect_format_by_extension(tmp_path, name, fmt):
    assert detect_format(tmp_path / name) == fmt


def test_detect_format_txt_needs_swissprot_id_line(tmp_path):
    uniprot = write(tmp_path / "uni.txt", "ID   X_HUMAN  Reviewed; 3 AA.\n")
    assert detect_format(uniprot) == "swissprot"
    with pytest.raises(RecordError, match="Swiss-Prot"):
        detect_format(write(tmp_path / "notes.txt", "label\nfoo\n"))


def test_detect_format_unknown_extension_lists_known(tmp_path):
    with pytest.raises(RecordError) as info:
        detect_format(tmp_path / "reads.bam")
    assert str(info.value).startswith(f"{tmp_path / 'reads.bam'}: unknown file extension")
    assert ".fasta" in str(info.value) and ".parquet" in str(info.value)
    with pytest.raises(RecordError):
        detect_format(tmp_path / "a.parquet.gz")


def test_list_input_files_expands_directories_sorted():
    from lucatrain.data.sources import IMAGE_EXTENSIONS

    files = list_input_files([DATA])
    assert files == sorted(files)
    images = [f for f in files if f.suffix in IMAGE_EXTENSIONS]  # the SimCLR samples: 171 photographs, 26 stacks
    assert len(images) == 197 and all("simclr_" in str(f) for f in images)
    assert [str(f.relative_to(DATA)) for f in files if f not in images] == [
        "clibd_sample.hdf5", "lucaone_sample/dev/dev.csv", "lucaone_sample/test/test.csv", "lucaone_sample/train/train.csv", "rrna_genes.fasta",
        "rrna_type/dev/dev.csv", "rrna_type/test/test.csv", "rrna_type/train/train.csv", "swissprot_sample.dat",
    ]  # fmt: skip
    # label/*.txt are label lists, not Swiss-Prot files, so they are left out.
    assert not any(f.suffix == ".txt" for f in files)
    # Files given explicitly keep the given order.
    given = [DATA / "swissprot_sample.dat", SAMPLE / "dev" / "dev.csv"]
    assert list_input_files(given) == given


def test_list_input_files_errors(tmp_path):
    with pytest.raises(RecordError, match="no such file or directory") as info:
        list_input_files([tmp_path / "missing.csv"])
    assert info.value.path == str(tmp_path / "missing.csv") and info.value.line is None
    (tmp_path / "empty").mkdir()
    write(tmp_path / "empty" / "README.md", "nothing here\n")
    with pytest.raises(RecordError, match="no input files"):
        list_input_files([tmp_path / "empty"])
    with pytest.raises(RecordError, match="more than once"):
        list_input_files([SAMPLE, SAMPLE / "dev" / "dev.csv"])


# ------------------------------------------------------------------------------------------
# RecordError


def test_record_error_message_and_pickle():
    err = RecordError("data/x.csv", 7, "empty sequence")
    assert str(err) == "data/x.csv:7: empty sequence"
    assert str(RecordError("data/x.csv", None, "no such file or directory")) == (
        "data/x.csv: no such file or directory"
    )
    back = pickle.loads(pickle.dumps(err))
    assert (back.path, back.line, back.reason, str(back)) == (err.path, 7, err.reason, str(err))
    assert isinstance(err, ValueError)


# ------------------------------------------------------------------------------------------
# LucaOne CSV: labels


def test_python_literal_label_equals_json_label(tmp_path):
    path = write(
        tmp_path / "l.csv",
        HEADER
        + "p1,prot,MKV,\"{'seq_level': {'prot_taxonomy': 1}}\"\n"
        + 'p2,prot,MKV,"{""seq_level"": {""prot_taxonomy"": 1}}"\n'
        + "p3,prot,MKV,{}\n"
        + "p4,prot,MKV,\n",
    )
    records, errors = split(list(iter_records(path)))
    assert errors == []
    assert records[0].labels == records[1].labels == '{"seq_level":{"prot_taxonomy":1}}'
    assert records[2].labels == records[3].labels == "{}"


def test_code_in_label_is_a_bad_record_never_executed(tmp_path, monkeypatch):
    marker = tmp_path / "PWNED"

    def forbidden(*args, **kwargs):
        raise AssertionError("eval() must never be called on input data")

    monkeypatch.setattr(builtins, "eval", forbidden)
    label = f"__import__('os').system('touch {marker}')"
    path = write(tmp_path / "evil.csv", HEADER + f'g1,gene,ACGT,"{label}"\ng2,gene,ACGT,{{}}\n')
    records, errors = split(list(iter_records(path)))
    assert [r.obj_id for r in records] == ["g2"]
    assert errors[0].line == 2 and "unparsable obj_label" in errors[0].reason
    assert not marker.exists()


@pytest.mark.parametrize("bad", ["[1, 2]", "{'a': {1, 2}}", "{'a': ", "not a label"])
def test_non_dict_or_unparsable_labels_rejected(bad):
    with pytest.raises(ValueError):
        parse_labels(bad)


# ------------------------------------------------------------------------------------------
# LucaOne CSV: bad input with exact file and line


def test_wrong_header_raises_naming_file_found_and_expected(tmp_path):
    path = write(tmp_path / "h.csv", "id,type,seq,label\ng1,gene,ACGT,{}\n")
    with pytest.raises(RecordError) as info:
        list(iter_records(path))
    msg = str(info.value)
    assert msg.startswith(f"{path}:1: ")
    assert "'id,type,seq,label'" in msg and "'obj_id,obj_type,obj_seq,obj_label'" in msg


def test_empty_csv_raises(tmp_path):
    with pytest.raises(RecordError, match="empty file"):
        list(iter_records(write(tmp_path / "e.csv", "")))


def test_bad_csv_records_reported_with_line_and_reason(tmp_path):
    rows = [
        "g1,gene,ACGT,{}",  # line 2: fine
        "g2,gene,ACGT",  # line 3: 3 columns
        "g3,gene,ACG7T,{}",  # line 4: digit in a gene
        "g4,gene,ACGJ,{}",  # line 5: J is a protein letter, not a nucleotide
        "g5,gene,,{}",  # line 6: empty sequence
        "g6,gene,ACGT,{'a': }",  # line 7: unparsable label
        "g7,rna,ACGT,{}",  # line 8: unknown obj_type
        "p1,protein,mkv,{}",  # line 9: fine, 'protein' accepted and upper-cased
    ]
    path = write(tmp_path / "bad.csv", HEADER + "\n".join(rows) + "\n")
    records, errors = split(list(iter_records(path)))
    assert [(r.obj_id, r.line, r.index) for r in records] == [("g1", 2, 0), ("p1", 9, 7)]
    assert records[1].obj_type == alphabet.PROT and records[1].seq == "MKV"
    assert [e.line for e in errors] == [3, 4, 5, 6, 7, 8]
    assert all(e.path == str(path) for e in errors)
    assert str(errors[0]) == f"{path}:3: expected 4 columns, found 3"
    assert str(errors[1]) == f"{path}:4: invalid gene residue '7' at residue 4 of 5"
    assert str(errors[2]) == f"{path}:5: invalid gene residue 'J' at residue 4 of 4"
    assert errors[3].reason == "empty sequence"
    assert errors[4].reason.startswith("unparsable obj_label")
    assert "obj_type must be 'gene' or 'prot'" in errors[5].reason


def test_csv_quoted_multiline_field_line_numbers(tmp_path):
    path = write(
        tmp_path / "q.csv",
        HEADER + 'g1,gene,ACGT,"{""a"": [1,\n2]}"\n\ng2,gene,AC,"{\'b\': \'x,y\'}"\n',
    )
    records, errors = split(list(iter_records(path)))
    assert errors == []
    assert [(r.obj_id, r.line) for r in records] == [("g1", 2), ("g2", 5)]
    assert records[0].labels == '{"a":[1,2]}' and records[1].labels == '{"b":"x,y"}'


def test_csv_invalid_utf8_is_a_bad_record_on_its_line(tmp_path):
    path = tmp_path / "u.csv"
    text = HEADER + "g1,gene,ACGT,{}\ng2,gene,AC\xffGT,{}\ng3,gene,A,{}\n"
    path.write_bytes(text.encode("latin-1"))  # \xff alone is not valid UTF-8
    records, errors = split(list(iter_records(path)))
    assert [r.obj_id for r in records] == ["g1", "g3"]
    assert errors[0].line == 3 and "UTF-8" in errors[0].reason


def test_missing_file_raises(tmp_path):
    with pytest.raises(RecordError) as info:
        iter_records(tmp_path / "nope.fasta")
    assert str(info.value) == f"{tmp_path / 'nope.fasta'}: no such file or directory"


# ------------------------------------------------------------------------------------------
# FASTA


def test_fasta_auto_type_per_record_and_lines(tmp_path):
    text = (
        ">dna1 some description\nACGTACGTAC\nGTACGTNNAC\n"  # lines 1-3
        "\n"  # line 4: blank
        ">prot1\nMKVLAAGIVGLLLA\n"  # line 5: protein letters
        ">dna_like_prot\nACGTRYKMSWBDHV\n"  # line 7: only nucleotide codes but < 90% ACGTUN
        ">rna\nacguacguuu\n"  # line 9: lower-case RNA is a gene, kept as given
    )
    records, errors = split(list(iter_records(write(tmp_path / "m.fasta", text))))
    assert errors == []
    got = [(r.obj_id, r.obj_type, r.line) for r in records]
    assert got == [
        ("dna1", alphabet.GENE, 1),
        ("prot1", alphabet.PROT, 5),
        ("dna_like_prot", alphabet.PROT, 7),
        ("rna", alphabet.GENE, 9),
    ]
    assert records[0].seq == "ACGTACGTACGTACGTNNAC"
    assert records[3].seq == "acguacguuu"


def test_fasta_forced_type(tmp_path):
    path = write(tmp_path / "f.fa", ">a\nACGT\n>b\nMKVL\n")
    as_prot, errors = split(list(iter_records(path, fasta_obj_type="prot")))
    assert errors == [] and [r.obj_type for r in as_prot] == [alphabet.PROT] * 2
    as_gene, errors = split(list(iter_records(path, fasta_obj_type="gene")))
    assert [r.obj_id for r in as_gene] == ["a"]  # M, K, V are IUPAC codes; L is not
    assert str(errors[0]) == f"{path}:3: invalid gene residue 'L' at residue 4 of 4"
    with pytest.raises(ValueError, match="fasta_obj_type"):
        iter_records(path, fasta_obj_type="dna")


def test_fasta_bad_records(tmp_path):
    path = write(tmp_path / "b.fa", "junk before\n>empty\n>ok\nMKV\n>\nMKV\n>bad\nMK7V\n")
    records, errors = split(list(iter_records(path)))
    assert [r.obj_id for r in records] == ["ok"]
    assert [(e.line, e.reason) for e in errors] == [
        (1, "text before the first '>' header"),
        (2, "empty sequence"),
        (5, "empty or missing obj_id ('')"),
        (7, "invalid prot residue '7' at residue 3 of 4"),
    ]
    # index counts bad records too: 'ok' is the second record of the file.
    assert records[0].index == 1


def test_fasta_gzip(tmp_path):
    path = tmp_path / "g.fa.gz"
    with gzip.open(path, "wt") as f:
        f.write(">x\nACGT\n>y\nMKVL\n")
    records, errors = split(list(iter_records(path)))
    assert errors == [] and [(r.obj_id, r.obj_type, r.line) for r in records] == [
        ("x", alphabet.GENE, 1), ("y", alphabet.PROT, 3)
    ]  # fmt: skip


# ------------------------------------------------------------------------------------------
# Swiss-Prot


def test_swissprot_bad_entry_reported_and_rest_kept(tmp_path):
    entries = (DATA / "swissprot_sample.dat").read_text().split("//\n")[:3]
    broken = entries[1].replace("\nSQ   ", "\nXX   ", 1)  # unknown line code
    text = entries[0] + "//\n" + broken + "//\n" + entries[2] + "//\n"
    path = write(tmp_path / "s.dat", text)
    id_lines = [i + 1 for i, line in enumerate(text.splitlines()) if line.startswith("ID   ")]
    records, errors = split(list(iter_records(path)))
    assert [r.line for r in records] == [id_lines[0], id_lines[2]]
    assert [r.index for r in records] == [0, 2]
    assert errors[0].line == id_lines[1] and "Swiss-Prot" in errors[0].reason


# ------------------------------------------------------------------------------------------
# JSONL and Parquet


def test_jsonl_records_and_bad_line(tmp_path):
    lines = [
        json.dumps({"obj_id": "g1", "obj_type": "gene", "obj_seq": "ACGT"}),
        "",  # blank: skipped, not a record
        json.dumps(  # 'seq' is accepted for obj_seq; a label may be a JSON object
            {"obj_id": "p1", "obj_type": "prot", "seq": "mkv", "obj_label": {"b": 1, "a": 2}}
        ),
        '{"obj_id": "x", "obj_type": "gene", ',  # line 4: truncated JSON
        json.dumps({"obj_id": "g2", "obj_type": "gene"}),  # line 5: no sequence
        json.dumps({"obj_id": "g3", "obj_type": "gene", "obj_seq": "AC", "obj_label": "{'k': 1}"}),
    ]
    path = write(tmp_path / "d.jsonl", "\n".join(lines) + "\n")
    records, errors = split(list(iter_records(path)))
    got = [(r.obj_id, r.line, r.index) for r in records]
    assert got == [("g1", 1, 0), ("p1", 3, 1), ("g3", 6, 4)]
    assert records[1].seq == "MKV" and records[1].labels == '{"a":2,"b":1}'
    assert records[2].labels == '{"k":1}'
    assert [e.line for e in errors] == [4, 5]
    assert str(errors[0]).startswith(f"{path}:4: invalid JSON")
    assert "obj_seq" in errors[1].reason


def test_parquet_records_row_numbers_and_errors(tmp_path):
    table = pa.table(
        {
            "obj_id": ["g1", "p1", "g2"],
            "obj_type": ["gene", "prot", "gene"],
            "obj_seq": ["ACGT", "MKV", "AC9T"],
            "obj_label": ['{"a": 1}', None, "{}"],
        }
    )
    path = tmp_path / "d.parquet"
    pq.write_table(table, path)
    records, errors = split(list(iter_records(path)))
    assert [(r.obj_id, r.obj_type, r.line, r.labels) for r in records] == [
        ("g1", alphabet.GENE, 1, '{"a":1}'),
        ("p1", alphabet.PROT, 2, "{}"),
    ]
    assert str(errors[0]) == f"{path}:3: invalid gene residue '9' at residue 3 of 4"

    no_type = tmp_path / "no_type.parquet"
    pq.write_table(table.drop_columns(["obj_type"]), no_type)
    with pytest.raises(RecordError, match=r"missing required column\(s\) \['obj_type'\]"):
        list(iter_records(no_type))

    garbage = write(tmp_path / "garbage.parquet", "this is not parquet")
    with pytest.raises(RecordError, match="cannot read Parquet") as info:
        list(iter_records(garbage))
    assert info.value.path == str(garbage)


def test_unknown_format_argument_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown format"):
        iter_records(DATA / "rrna_genes.fasta", fmt="genbank")
