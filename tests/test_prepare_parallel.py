"""Corpus-scale prepare: shards, worker processes, resume after a kill (issue 12, item 3).

Every test compares against a prepare of the same inputs in one process with one shard, which is
the code path every earlier dataset was made with: the rows, their order and meta.json must not
depend on how the work was cut or how many processes did it.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import DATA, LUCAONE_DEV, LUCAONE_TRAIN, REPO

from lucatrain.data.prepared import PARTIAL_SUFFIX, prepare
from lucatrain.data.sources import RecordError, fasta_spans, iter_records
from lucatrain.families.lucaone.family import LUCAONE_RECIPE

FASTA = DATA / "rrna_genes.fasta"  # 3,018 records, 5.1 MB
SWISS = DATA / "swissprot_sample.dat"
LUCAONE_TEST = DATA / "lucaone_sample" / "test" / "test.csv"
SMALL_SHARDS = 300_000  # bytes: the FASTA becomes 17 spans, each small file a shard of its own


def content(data) -> tuple[dict, dict]:
    """(every column of every row, meta.json without its creation time) of a prepared dataset."""
    meta = {k: v for k, v in data.meta.items() if k != "created"}
    return data.dataset.data.table.to_pydict(), meta


def where(records) -> list[tuple]:
    return [(r.index, r.line, r.obj_id, r.seq, r.obj_type) if not isinstance(r, RecordError) else (str(r),) for r in records]


def test_fasta_spans_read_exactly_the_records_of_a_whole_file_read(tmp_path):
    # Blank lines, CRLF line ends, a byte-order mark, a record split across many lines.
    odd = tmp_path / "odd.fasta"
    odd.write_bytes(b"\xef\xbb\xbf>a first\r\nACGT\r\nAC\r\n\r\n>b\nMKV\nLL\n>c\n\n>d x y\n" + b"ACGTN\n" * 50 + b">e\nGG")
    for path, targets in ((FASTA, (1000, 300_000, 10**9)), (odd, (1, 7, 30, 10**9))):
        whole = where(iter_records(path, "fasta"))
        for target in targets:
            spans = fasta_spans(path, target)
            assert spans[0].start == 0 and spans[-1].end == path.stat().st_size
            assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
            assert where(r for span in spans for r in iter_records(path, "fasta", span=span)) == whole, (path, target)
    assert len(fasta_spans(FASTA, SMALL_SHARDS)) == 17


def test_byte_ranges_are_refused_for_other_formats():
    with pytest.raises(ValueError, match="only FASTA files are read by byte range"):
        iter_records(SWISS, "swissprot", span=fasta_spans(FASTA, 10**9)[0])


def test_parallel_shards_give_the_one_process_dataset(tmp_path):
    """LucaOne CSVs with labels (the recipe's label statistics are merged from the shards), the FASTA
    cut into spans, Swiss-Prot: 2 worker processes, small shards."""
    inputs = [LUCAONE_TRAIN, FASTA, LUCAONE_DEV, SWISS, LUCAONE_TEST]
    serial = prepare(inputs, tmp_path / "serial", recipe=LUCAONE_RECIPE, workers=1)
    parallel = prepare(inputs, tmp_path / "parallel", recipe=LUCAONE_RECIPE, workers=2, shard_bytes=SMALL_SHARDS)
    assert content(parallel) == content(serial)
    assert parallel.num_records == 2494 + 3018 + 312 + 100 + 312
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parallel", "serial"]  # no .partial left
    assert serial.meta["labels"]["gene_taxonomy"]["records"] > 0  # the merged statistics are not empty


def _with_bad_records(tmp_path) -> Path:
    """The FASTA with a residue no alphabet has in record 500 and in record 2,500 (different shards)."""
    lines = FASTA.read_text().splitlines(keepends=True)
    headers = [i for i, line in enumerate(lines) if line.startswith(">")]
    for record in (500, 2500):
        lines[headers[record] + 1] = "ACGT#ACGT\n"
    bad = tmp_path / "bad.fasta"
    bad.write_text("".join(lines))
    return bad


def test_the_first_bad_record_in_input_order_is_raised_and_nothing_is_left(tmp_path):
    bad = _with_bad_records(tmp_path)
    out = tmp_path / "out" / "ds"
    with pytest.raises(RecordError) as serial_error:
        prepare([bad], out, workers=1)
    with pytest.raises(RecordError) as parallel_error:
        prepare([bad], out, workers=2, shard_bytes=SMALL_SHARDS)
    assert str(parallel_error.value) == str(serial_error.value)
    assert str(parallel_error.value).startswith(f"{bad}:")
    assert list(out.parent.iterdir()) == []  # neither the dataset nor its shards


def test_skipped_records_and_dropped_duplicates_match_one_process(tmp_path):
    bad = _with_bad_records(tmp_path)
    copy = tmp_path / "copy.fasta"  # every obj_id again, in another file: all dropped
    copy.write_text(FASTA.read_text())
    inputs = [bad, copy]
    for options in ({"bad_records": "skip"}, {"bad_records": "skip", "duplicates": "drop"}):
        serial = prepare(inputs, tmp_path / "serial", workers=1, **options)
        parallel = prepare(inputs, tmp_path / "parallel", workers=2, shard_bytes=SMALL_SHARDS, **options)
        assert content(parallel) == content(serial)
        assert (parallel.path / "rejects.jsonl").read_text() == (serial.path / "rejects.jsonl").read_text()
        assert parallel.meta["num_rejected"] == 2
        # The two rejected records of bad.fasta first appear in copy.fasta: only 3,016 are copies.
        assert parallel.meta["duplicate_obj_ids"]["records"] == 3016
        assert parallel.num_records == (3016 + 2 if options.get("duplicates") == "drop" else 3016 + 3018)
        for data in (serial, parallel):
            shutil.rmtree(data.path)


def _prepare_cli(out: Path, *extra: str, fault: str | None = None) -> tuple[int, str, int]:
    """(exit status, stderr, session id) of `lucatrain prepare` with 2 workers and small shards."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if fault:
        env["LUCATRAIN_FAULT"] = fault
    cmd = [sys.executable, "-m", "lucatrain", "prepare", str(LUCAONE_TRAIN), str(FASTA), str(SWISS), "--out", str(out),
           "--workers", "2", "--shard-mb", str(SMALL_SHARDS / 2**20), *extra]  # fmt: skip
    log = out.with_name(out.name + ".log")
    with open(log, "w") as stderr:
        # Output to a file, not a pipe: workers orphaned by a kill must not keep the test waiting on it.
        process = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        code = process.wait(timeout=300)
    return code, log.read_text(), process.pid


def _processes_in_session(session: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session:  # field 6 of /proc/PID/stat, the session id
            found.append(int(stat.parent.name))
    return found


@pytest.mark.multiprocess
def test_a_prepare_killed_half_way_resumes_its_shards_and_gives_the_same_dataset(tmp_path):
    reference = prepare([LUCAONE_TRAIN, FASTA, SWISS], tmp_path / "reference", recipe=LUCAONE_RECIPE, workers=1)
    out = tmp_path / "ds"
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    code, _, session = _prepare_cli(out, fault="prepare_shard:4")  # SIGKILL once 4 shards are finished
    assert code == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while _processes_in_session(session) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _processes_in_session(session) == []  # the orphaned workers ended themselves
    assert not out.exists()  # never a half-written dataset
    finished = sorted(p.name for p in (partial / "shards").glob("*.json"))
    assert len(finished) >= 4
    plan = json.loads((partial / "plan.json").read_text())
    assert len(finished) < len(plan["shards"]) == 19  # the CSV, 17 FASTA spans, Swiss-Prot
    code, stderr, _ = _prepare_cli(out)
    assert code == 0, stderr[-3000:]
    assert "resuming an interrupted prepare" in stderr and "of 19 shards are finished" in stderr
    assert not partial.exists()
    from lucatrain.data.prepared import load_prepared

    again = load_prepared(out)
    assert again.fingerprint == reference.fingerprint
    assert content(again) == content(reference)


def test_a_partial_prepare_of_other_shards_is_started_over(tmp_path, caplog):
    """A restart with another shard size cannot reuse the shards: it starts over, and is still right."""
    inputs = [FASTA, SWISS]
    out = tmp_path / "ds"
    partial = out.with_name(out.name + PARTIAL_SUFFIX)
    (partial / "shards").mkdir(parents=True)
    (partial / "plan.json").write_text(json.dumps({"fingerprint": "something else"}))
    (partial / "shards" / "000000.json").write_text("{}")
    logger = logging.getLogger("lucatrain")  # earlier tests' runs may have set it not to propagate
    logger.addHandler(caplog.handler)
    level, logger.level = logger.level, logging.INFO
    try:
        data = prepare(inputs, out, workers=1, shard_bytes=SMALL_SHARDS)
    finally:
        logger.removeHandler(caplog.handler)
        logger.setLevel(level)
    assert "an interrupted prepare of other inputs or options; starting over" in caplog.text
    assert content(data) == content(prepare(inputs, tmp_path / "reference", workers=1))
    assert not partial.exists()
