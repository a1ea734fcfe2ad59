"""`lucatrain prepare` at corpus scale: throughput and peak memory at 10 %, 50 % and 100 % of a corpus.

The corpus is Debian's ncbi-rrna-data: 434,435 real rRNA records, 713 MB of FASTA in three files
(`bash bench/get_rrna_corpus.sh DIR` dumps it). A fraction f is the first f of the corpus's bytes:
whole files, then a prefix of the next one cut at a record boundary (same file names, so the same
sample ids). Each run is the real command, `lucatrain prepare SUBSET --out OUT --workers W`, in a
fresh process; its memory is the resident set of that process and of its workers, sampled every
50 ms (peak of the sum, and of the largest single process).

Baseline in the same invocation: the 10 % subset with one worker. Ratios:

    memory_100_over_10     peak memory at 100 % / at 10 %         target <= 1.25 (flat)
    throughput_100_over_10 records/s at 100 % / at 10 %           target >= 0.8
    speedup_workers        records/s with W workers / 1 worker, 10 %   (reported)

and the marginal rate from 10 % to 100 % (extra records / extra seconds), which leaves out the fixed
start of each run (imports, spawning the workers).

    python bench/bench_prepare.py --corpus /tmp/rrna-corpus [--fractions 0.1,0.5,1] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from lucatrain.data.sources import fasta_spans  # noqa: E402


def subset(files: list[Path], fraction: float, out: Path) -> tuple[list[Path], int]:
    """The first `fraction` of the corpus's bytes as files in `out` (hard links, one cut copy)."""
    out.mkdir(parents=True)
    wanted = fraction * sum(path.stat().st_size for path in files)
    taken, chosen = 0, []
    for path in files:
        if taken >= wanted:
            break
        target = out / path.name
        size = path.stat().st_size
        if taken + size <= wanted:
            os.link(path, target)
            taken += size
        else:
            cut = fasta_spans(path, int(wanted - taken))[0].end  # the first record boundary past the need
            with open(path, "rb") as source, open(target, "wb") as sink:
                sink.write(source.read(cut))
            taken += cut
        chosen.append(target)
    return chosen, taken


def rss_of_session(session: int) -> list[int]:
    """Resident bytes of each process in `session`."""
    found = []
    page = os.sysconf("SC_PAGE_SIZE")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[3]) == session:
                found.append(int((stat.parent / "statm").read_text().split()[1]) * page)
        except (OSError, ValueError, IndexError):
            continue
    return found


def run_prepare(inputs: list[Path], out: Path, workers: int) -> dict:
    cmd = [sys.executable, "-m", "lucatrain", "prepare", *map(str, inputs), "--out", str(out), "--workers", str(workers)]
    peaks = {"total": 0, "largest": 0}
    start = time.perf_counter()
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    done = threading.Event()

    def sample():
        while not done.is_set():
            sizes = rss_of_session(process.pid)
            if sizes:
                peaks["total"] = max(peaks["total"], sum(sizes))
                peaks["largest"] = max(peaks["largest"], max(sizes))
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, stderr = process.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if process.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {process.returncode}:\n{stderr[-3000:]}")
    meta = json.loads((out / "meta.json").read_text())
    return {"seconds": seconds, "records": meta["num_records"], "residues": meta["total_residues"],
            "peak_rss_total": peaks["total"], "peak_rss_largest": peaks["largest"]}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=Path("/tmp/rrna-corpus"), help="directory of *.fasta (get_rrna_corpus.sh)")
    parser.add_argument("--fractions", default="0.1,0.5,1")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--work-dir", type=Path, default=None, help="where subsets and outputs go (default: a temp dir)")
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    files = sorted(args.corpus.glob("*.fasta"))
    if not files:
        raise SystemExit(f"no *.fasta in {args.corpus}: run bash bench/get_rrna_corpus.sh {args.corpus}")
    load_before = _common.warn_if_busy()
    fractions = [float(f) for f in args.fractions.split(",")]
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="lucatrain-prepare-bench-", dir=args.work_dir) as tmp:
        tmp = Path(tmp)
        runs = [(fractions[0], 1)] + [(f, args.workers) for f in fractions]
        for fraction, workers in runs:
            inputs, size = subset(files, fraction, tmp / f"in-{fraction}-{workers}")
            result = run_prepare(inputs, tmp / f"out-{fraction}-{workers}", workers)
            result.update(fraction=fraction, workers=workers, input_bytes=size)
            results[f"{fraction}x{workers}"] = result
            rows.append([f"{fraction:.0%}", workers, f"{result['records']:,}", size / 2**20, result["seconds"],
                         result["records"] / result["seconds"], size / 2**20 / result["seconds"],
                         result["peak_rss_total"] / 2**20, result["peak_rss_largest"] / 2**20])  # fmt: skip
            shutil.rmtree(tmp / f"out-{fraction}-{workers}")
            shutil.rmtree(tmp / f"in-{fraction}-{workers}")
    _common.print_table(["corpus", "workers", "records", "input MB", "seconds", "records/s", "MB/s", "peak RSS MB (all)",
                         "largest process MB"], rows)  # fmt: skip
    low, high = results[f"{fractions[0]}x{args.workers}"], results[f"{fractions[-1]}x{args.workers}"]
    serial = results[f"{fractions[0]}x1"]

    def rate(r):
        return r["records"] / r["seconds"]

    lines = [
        _common.ratio_line("memory_100_over_10", high["peak_rss_total"] / low["peak_rss_total"], 1.25, higher_is_better=False),
        _common.ratio_line("throughput_100_over_10", rate(high) / rate(low), 0.8),
    ]
    for line, _ in lines:
        print(line)
    print(f"speedup_workers={rate(low) / rate(serial):.3f} ({args.workers} workers vs 1, {fractions[0]:.0%} of the corpus)")
    # Each run pays a fixed start (imports, spawning workers): the rate between two sizes leaves it out.
    marginal = (high["records"] - low["records"]) / (high["seconds"] - low["seconds"])
    marginal_mb = (high["input_bytes"] - low["input_bytes"]) / 2**20 / (high["seconds"] - low["seconds"])
    print(f"marginal rate {fractions[0]:.0%} -> {fractions[-1]:.0%}: {marginal:,.0f} records/s, {marginal_mb:.1f} MB/s")
    _common.write_results("prepare", {
        "corpus": str(args.corpus), "files": [f.name for f in files], "runs": results,
        "ratios": {"memory_100_over_10": high["peak_rss_total"] / low["peak_rss_total"],
                   "throughput_100_over_10": rate(high) / rate(low), "speedup_workers": rate(low) / rate(serial)},
        "marginal_records_per_s": marginal, "marginal_mb_per_s": marginal_mb,
        "other_load_before": load_before, "other_load_after": _common.other_load(),
    }, args.out_dir)  # fmt: skip


if __name__ == "__main__":
    main()
