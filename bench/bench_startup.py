"""Start-up: from the command `lucatrain demo` to its first optimizer step (issue 12, item 6).

Each run is a fresh process started from a temporary directory, timed from just before the spawn to
the moment the first optimizer step has finished (a callback, `_startup_probe.FirstStep`, writes the
clock there and ends the process). Two conditions, alternated, `--repeats` times each:

    cold   an empty torch extension cache (TORCH_EXTENSIONS_DIR) and no C/C++ compiler or ninja on
           PATH: a first start on a fresh install. Before lucatrain stopped DeepSpeed's CPU comm op
           from being JIT-built this took about 70 s more (with a compiler) or failed (without one).
    warm   the same cache directory again, the compilers back on PATH.

Baseline, same invocation: `python -c "import lucatrain.trainer, deepspeed, transformers"`, the
import floor every start pays. Target (issue 12): first step <= 10 s, median of the cold starts.

    python bench/bench_startup.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

TARGET_S = 10.0
PROBE = "_startup_probe:FirstStep"


def _path_without_compilers(bin_dir: Path) -> str:
    bin_dir.mkdir(exist_ok=True)
    for name in ("python", "python3", "lucatrain"):
        target = sys.executable if name.startswith("python") else shutil.which("lucatrain")
        if not (bin_dir / name).exists():
            (bin_dir / name).symlink_to(target)
    return str(bin_dir)


def time_demo(work: Path, env: dict) -> float:
    """Seconds from the spawn of `lucatrain demo` to the end of its first optimizer step."""
    probe = work / "first_step"
    probe.unlink(missing_ok=True)
    env = {**env, "LUCATRAIN_STARTUP_PROBE": str(probe), "PYTHONPATH": str(_common.BENCH_DIR)}
    start = time.time()
    result = subprocess.run(["lucatrain", "demo", f"train.callbacks=[{PROBE}]", "train.progress_bar=false"], cwd=work, env=env,
                            capture_output=True, text=True, timeout=600)  # fmt: skip
    if not probe.exists():
        raise SystemExit(f"lucatrain demo exited {result.returncode} before its first step:\n{result.stderr[-3000:]}")
    return float(probe.read_text()) - start


def time_imports(env: dict) -> float:
    start = time.time()
    subprocess.run([sys.executable, "-c", "import lucatrain.trainer, deepspeed, transformers"], env=env, check=True,
                   capture_output=True)  # fmt: skip
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", type=Path, default=None)
    args = parser.parse_args()
    load_before = _common.warn_if_busy()
    times = {"imports": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory(prefix="lucatrain-startup-") as tmp:
        tmp = Path(tmp)
        base = {**os.environ, "PYTHONUNBUFFERED": "1"}
        bare_path = _path_without_compilers(tmp / "bin")
        for repeat in range(args.repeats):
            times["imports"].append(time_imports(base))
            cache = tmp / f"extensions-{repeat}"  # a new empty cache for each cold start
            cold_env = {**base, "PATH": bare_path, "TORCH_EXTENSIONS_DIR": str(cache)}
            times["cold"].append(time_demo(tmp, cold_env))
            built = [p for p in cache.rglob("*") if p.is_file()] if cache.exists() else []
            if built:
                raise SystemExit(f"a start built something in the extension cache: {built}")
            times["warm"].append(time_demo(tmp, {**base, "TORCH_EXTENSIONS_DIR": str(cache)}))
    medians = {name: statistics.median(values) for name, values in times.items()}
    rows = [[name, medians[name], min(values), max(values), len(values)] for name, values in times.items()]
    _common.print_table(["phase", "median s", "min s", "max s", "runs"], rows)
    print(f"first step minus imports (cold, median): {medians['cold'] - medians['imports']:.2f} s")
    line, ok = _common.ratio_line("first_step_cold_s_over_target", medians["cold"] / TARGET_S, 1.0, higher_is_better=False)
    print(line)
    _common.write_results("startup", {
        "seconds": times, "median_s": medians, "target_s": TARGET_S, "target_met": ok,
        "other_load_before": load_before, "other_load_after": _common.other_load(),
    }, args.out_dir)  # fmt: skip


if __name__ == "__main__":
    main()
