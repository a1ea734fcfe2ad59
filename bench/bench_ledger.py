"""The progress ledger at 10 M, 100 M and 1 B consumed samples (synthetic; no training).

For each size S the run so far is S samples consumed over 100 checkpoints (100 ids segments of S/100
ids and 100 steps segments, written into a store as the trainer writes them), then measured:

    write   the next checkpoint's ledger: 10,000 new samples (10 steps of 1,000) -> state + segments,
            time and bytes written
    load    Ledger.from_state_dict of the newest state (what a resume does) and the resume's
            consumed_ids(epoch, prefix=0) (same order: no segment read), time
    inline  for comparison, the ledger as it was stored before segments (every id in the checkpoint's
            state): bytes and time of writing it, at 10 M only (1 B would be 8 GB per checkpoint)

Targets (issue 12): write at 1 B <= 2x its time at 10 M; resume at 1 B <= 1.2x a fresh start. The
second is measured here for the ledger's part of a resume (its load at 1 B against 10 M, and in
milliseconds against a fresh ledger); a whole resume of a 1 B-sample run needs a corpus of that size.

    python bench/bench_ledger.py [--sizes 10000000,100000000,1000000000] [--dir /tmp/ledger-bench]
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

from lucatrain.progress import Ledger  # noqa: E402
from lucatrain.state import write_state  # noqa: E402

CHECKPOINTS = 100
NEW_SAMPLES, NEW_STEPS = 10_000, 10


def history(size: int, store: Path) -> Ledger:
    """A ledger that consumed `size` samples in CHECKPOINTS saves, its segments written to `store`."""
    ledger = Ledger()
    ledger.start_epoch(0, {"seed": 1}, "f" * 64)
    rng = np.random.default_rng(0)
    per_save = size // CHECKPOINTS
    step = 0
    for _ in range(CHECKPOINTS):
        ids = rng.integers(0, 2**62, per_save, dtype=np.int64)
        # One step record per save here: the steps table's size does not change what is measured.
        step += 1
        ledger.record_step(step, 0, ledger.cursor, ledger.cursor + per_save, ids, tokens=per_save * 100)
        ledger.state_dict(store)
    return ledger


def timed_write(ledger: Ledger, store: Path, state_dir: Path) -> tuple[float, int]:
    rng = np.random.default_rng(1)
    for _ in range(NEW_STEPS):
        n = NEW_SAMPLES // NEW_STEPS
        ledger.record_step(ledger.all_steps()[-1][0] + 1 if ledger.all_steps() else 1, 0, ledger.cursor, ledger.cursor + n,
                           rng.integers(0, 2**62, n, dtype=np.int64), tokens=n * 100)  # fmt: skip
    before = sum(f.stat().st_size for f in store.iterdir())
    started = time.perf_counter()
    state = ledger.state_dict(store)
    write_state(state_dir, {"ledger": state})
    seconds = time.perf_counter() - started
    written = sum(f.stat().st_size for f in store.iterdir()) - before + sum(f.stat().st_size for f in state_dir.iterdir())
    return seconds, written


def timed_load(state_dir: Path, store: Path) -> float:
    from lucatrain.state import read_state

    started = time.perf_counter()
    ledger = Ledger.from_state_dict(read_state(state_dir)["ledger"], "bench", store)
    ledger.consumed_ids(ledger.epoch, 0)  # what a same-order resume asks for
    return time.perf_counter() - started


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="10000000,100000000,1000000000")
    p.add_argument("--dir", default=None, help="scratch directory (1 B needs about 8 GB)")
    args = p.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    root = Path(args.dir or tempfile.mkdtemp(prefix="ledger-bench-"))
    results = {"sizes": {}}
    fresh_dir = root / "fresh"
    write_state(fresh_dir, {"ledger": Ledger().state_dict(root / "fresh-store")})
    fresh = min(timed_load(fresh_dir, root / "fresh-store") for _ in range(30))
    print(f"{'consumed':>14} {'write s':>9} {'bytes':>9} {'load s':>9}   (fresh ledger load {fresh * 1e3:.2f} ms)")
    for size in sizes:
        store, state_dir = root / f"store-{size}", root / f"state-{size}"
        shutil.rmtree(store, ignore_errors=True)
        started = time.perf_counter()
        ledger = history(size, store)
        built = time.perf_counter() - started
        seconds, written = timed_write(ledger, store, state_dir)
        load = min(timed_load(state_dir, store) for _ in range(30))
        results["sizes"][size] = {"write_s": seconds, "write_bytes": written, "load_s": load, "built_s": built,
                                  "store_bytes": sum(f.stat().st_size for f in store.iterdir())}  # fmt: skip
        print(f"{size:>14,} {seconds:>9.4f} {written:>9,} {load:>9.5f}   (history of {size:,} written in {built:.1f} s)")
        shutil.rmtree(store, ignore_errors=True)
    # The ledger as it was stored before segments, at the smallest size: the whole id list in every checkpoint.
    inline = Ledger()
    inline.start_epoch(0, {"seed": 1}, "f" * 64)
    inline.record_step(1, 0, 0, sizes[0], np.random.default_rng(0).integers(0, 2**62, sizes[0], dtype=np.int64), tokens=0)
    started = time.perf_counter()
    write_state(root / "inline", {"ledger": inline.state_dict()})
    inline_s = time.perf_counter() - started
    inline_bytes = sum(f.stat().st_size for f in (root / "inline").iterdir())
    print(f"inline (before segments) at {sizes[0]:,}: {inline_s:.3f} s, {inline_bytes:,} bytes per checkpoint")
    results["inline"] = {"consumed": sizes[0], "write_s": inline_s, "write_bytes": inline_bytes}
    small, large = results["sizes"][sizes[0]], results["sizes"][sizes[-1]]
    results["write_ratio"] = large["write_s"] / small["write_s"]
    # The load is a JSON parse of the segment list (one entry per checkpoint), whatever the samples: its
    # growth from the smallest to the largest size is what says O(1). Against a fresh ledger the ratio is
    # of sub-millisecond times; against a whole resume (bench_resume.py: 4.4 s from process start) the
    # load adds well under 0.1 %.
    results["load_ratio"] = large["load_s"] / small["load_s"]
    results["fresh_load_s"] = fresh
    print(_common.ratio_line("ledger_write_largest_vs_smallest", results["write_ratio"], 2.0, higher_is_better=False)[0])
    print(_common.ratio_line("ledger_load_largest_vs_smallest", results["load_ratio"], 1.2, higher_is_better=False)[0])
    _common.write_results("ledger", results)
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
