"""Helpers shared by the benchmark scripts: machine info, the RATIO line, the JSON result file.

Every script runs its baseline and the lucatrain path in one invocation, prints a table and one
`RATIO name=value target=>=T PASS|FAIL` line per target, and writes bench/results/<name>.json.
A missed target is *reported*, not fatal: the scripts exit 0 unless they crash.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
DATA = REPO / "examples" / "data"
RRNA_FASTA = DATA / "rrna_genes.fasta"
SWISSPROT_DAT = DATA / "swissprot_sample.dat"
LUCAONE_TRAIN = DATA / "lucaone_sample" / "train" / "train.csv"
LUCAONE_DEV = DATA / "lucaone_sample" / "dev" / "dev.csv"

if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .` too
    sys.path.insert(0, str(REPO))


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict:
    """What the figures were measured on; the numbers mean little without it."""
    import numpy as np
    import torch

    info = {
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cpu_model": _cpu_model(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "device": "cuda" if torch.cuda.is_available() else "cpu",
    }
    if torch.cuda.is_available():
        info["cuda_device"] = torch.cuda.get_device_name(0)
    try:
        import deepspeed

        info["deepspeed"] = deepspeed.__version__
    except Exception:  # noqa: BLE001  (deepspeed is optional for some scripts)
        pass
    return info


def other_load(seconds: float = 1.0) -> float:
    """CPUs' worth of work done by *other* processes over `seconds` while this one sleeps.

    Timings on a 2-core machine are only meaningful when nothing else runs: with torch using both
    cores, one busy neighbour makes OpenMP threads wait on each other and a step can take many times
    longer. Scripts record this figure and warn when it is high; it is not a correction factor.
    """
    def busy_idle():
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy0, total0 = busy_idle()
        time.sleep(seconds)
        busy1, total1 = busy_idle()
    except (OSError, ValueError, IndexError):
        return float("nan")
    share = (busy1 - busy0) / max(1, total1 - total0)
    return share * (os.cpu_count() or 1)


def warn_if_busy(threshold: float = 0.3) -> float:
    load = other_load()
    if load > threshold:
        print(f"WARNING: other processes keep {load:.1f} CPUs busy; timings will be low and noisy "
              f"(torch threads wait on each other when cores are shared)", file=sys.stderr)  # fmt: skip
    return load


def ratio_line(name: str, value: float, target: float, higher_is_better: bool = True) -> tuple[str, bool]:
    """The one-line verdict scripts print and tests/CI can grep: by default higher is better and the
    target a minimum; with `higher_is_better` False the target is a maximum."""
    ok = value >= target if higher_is_better else value <= target
    bound = ">=" if higher_is_better else "<="
    return f"RATIO {name}={value:.3f} target={bound}{target:g} {'PASS' if ok else 'FAIL'}", ok


def alternate_timing(batches, sides: dict) -> dict[str, list[float]]:
    """Seconds per batch of each side ({name: fn(batch)}), the sides taking turns on every batch and who
    goes first alternating, so a slow phase of a shared machine hits both alike."""
    times = {name: [] for name in sides}
    for i, batch in enumerate(batches):
        order = list(sides.items())
        if i % 2:
            order.reverse()
        for name, fn in order:
            start = time.perf_counter()
            fn(batch)
            times[name].append(time.perf_counter() - start)
    return times


def print_table(headers: list[str], rows: list[list]) -> None:
    """A plain fixed-width table (no third-party formatter needed)."""
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print("  ".join(c.rjust(w) for c, w in zip(row, widths)))


def _fmt(value) -> str:
    if isinstance(value, float):
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def write_results(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """bench/results/<name>.json with the figures, the targets and the machine."""
    out_dir = Path(out_dir) if out_dir else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {"name": name, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine_info(), **payload}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def quiet_deepspeed() -> None:
    """DeepSpeed logs at INFO/WARNING on every initialize; keep the tables readable."""
    import logging

    import deepspeed  # noqa: F401  (creates its logger, whose level we then lower)

    for name in ("DeepSpeed", "deepspeed"):
        logging.getLogger(name).setLevel(logging.ERROR)
