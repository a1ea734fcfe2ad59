"""Does `lucatrain demo` still compute what it computed before a refactor?

Runs the demo (400 steps, ~70 s on 2 cores) into a fresh directory with a fresh data cache, then
compares its history.jsonl with a reference history, entry by entry and key by key, after removing
the fields that measure the machine rather than the computation (tokens_per_s, samples_per_s,
peak_memory_mb). Prints the first difference, or how many entries and values were identical.

The shipped reference, bench/results/demo_history_before_families.jsonl, is the demo's history on
main before the model-family refactor (commit 39cf72a), measured on the 2-core CPU machine; floats
are compared exactly, so another CPU (other BLAS kernels) may differ in the last bits.

    python bench/check_demo_history.py [--reference FILE] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MACHINE_FIELDS = ("tokens_per_s", "samples_per_s", "peak_memory_mb")


def load_history(path: Path) -> list[dict]:
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    return [{k: v for k, v in entry.items() if k not in MACHINE_FIELDS} for entry in entries]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", type=Path, default=REPO / "bench" / "results" / "demo_history_before_families.jsonl")
    parser.add_argument("--keep", type=Path, default=None, help="run directory to keep (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.keep or Path(tmp) / "demo"
        cmd = [sys.executable, "-m", "lucatrain", "demo", f"train.output_dir={run}", f"data.cache_dir={Path(tmp) / 'cache'}",
               "train.progress_bar=false"]  # fmt: skip
        subprocess.run(cmd, cwd=REPO, check=True, capture_output=True)
        got, want = load_history(run / "history.jsonl"), load_history(args.reference)
    values = 0
    for i, (a, b) in enumerate(zip(got, want)):
        if a != b:
            diff = {k: (b.get(k), a.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}
            print(f"entry {i} (step {b.get('step')}) differs, (reference, now): {diff}")
            return 1
        values += len(a)
    if len(got) != len(want):
        print(f"{len(got)} entries now, {len(want)} in the reference")
        return 1
    print(f"identical: {len(got)} logged entries, {values} values (timing and memory fields removed) equal to {args.reference.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
