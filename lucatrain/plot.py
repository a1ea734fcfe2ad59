"""`lucatrain plot RUN_DIR`: PNG curves of a run's history.jsonl, for people who would rather look than read.

    RUN_DIR/plots/loss.png        training loss and every dev split's loss against the step
    RUN_DIR/plots/lr.png          the learning rate
    RUN_DIR/plots/<metric>.png    each other metric: training (if logged) and every dev split

Needs matplotlib (`pip install matplotlib`); drawn without a display (the Agg backend).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from pathlib import Path

SKIP = {"step", "epoch", "tokens_per_s", "samples_per_s", "peak_memory_mb", "grad_norm"}


def series(history: list[dict]) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """{metric: {curve: [(step, value)]}}: curve 'train' for training entries, the split's name for `eval/<split>/<metric>`."""
    out: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for entry in history:
        step = entry.get("step")
        for key, value in entry.items():
            if key in SKIP or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if key.startswith("eval/"):
                parts = key.split("/")
                curve, metric = (parts[1], "/".join(parts[2:])) if len(parts) > 2 else ("dev", parts[1])
            else:
                curve, metric = "train", key
            out[metric][curve].append((step, float(value)))
    return out


def plot_run(run_dir) -> list[Path]:
    """Write the PNGs of `run_dir`'s history; returns their paths."""
    run_dir = Path(run_dir)
    history_file = run_dir / "history.jsonl"
    if not history_file.is_file():
        raise FileNotFoundError(f"{history_file} not found (expected a lucatrain run directory)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ValueError(f"`lucatrain plot` needs matplotlib (`pip install matplotlib`): {err}") from None
    history = [json.loads(line) for line in history_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    out_dir = run_dir / "plots"
    out_dir.mkdir(exist_ok=True)
    written = []
    for metric, curves in sorted(series(history).items()):
        figure, axes = plt.subplots(figsize=(6, 3.5), dpi=100)
        for curve, points in sorted(curves.items()):
            steps, values = zip(*points)
            axes.plot(steps, values, marker="o" if len(points) < 30 else None, markersize=3, label=curve)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(metric)
        axes.set_title(f"{run_dir.name}: {metric}")
        if metric == "lr":
            axes.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
        figure.tight_layout()
        path = out_dir / (re.sub(r"[^A-Za-z0-9_.-]+", "_", metric) + ".png")
        figure.savefig(path)
        plt.close(figure)
        written.append(path)
    return written
