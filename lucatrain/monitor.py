"""Observability: logs/training.log, TensorBoard scalars and the rank-0 progress bar.

Only rank 0 writes; other ranks get no-op writers, so callers never check the rank.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from lucatrain import dist

LOGGER_NAME = "lucatrain"


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class ConsoleHandler(logging.StreamHandler):
    """Console log lines that never land inside the progress bar: while a bar is shown they go
    through `tqdm.write`, which clears the bar, writes the line and redraws the bar below it."""

    bar_shown = False  # set by Monitor for the lifetime of its bar

    def emit(self, record: logging.LogRecord) -> None:
        if not ConsoleHandler.bar_shown:
            super().emit(record)
            return
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # noqa: BLE001  (logging's own contract: report, never raise from emit)
            self.handleError(record)


def setup_logging(run_dir: Path | None, level: str = "INFO") -> logging.Logger:
    """Console + logs/training.log on rank 0; warnings and errors only on other ranks."""
    logger = get_logger()
    logger.handlers.clear()
    logger.propagate = False
    logger.setLevel(level if dist.is_main() else "WARNING")
    fmt = logging.Formatter(f"%(asctime)s [rank{dist.rank()}] %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S")
    console = ConsoleHandler(sys.stderr)
    console.setFormatter(fmt)
    logger.addHandler(console)
    if run_dir is not None and dist.is_main():
        (run_dir / "logs").mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(run_dir / "logs" / "training.log", encoding="utf-8")
        file_handler.setFormatter(fmt)
        logger.addHandler(file_handler)
    return logger


class Monitor:
    """Scalars to TensorBoard and the log, and a progress bar, from rank 0 only."""

    def __init__(self, run_dir: Path, total_steps: int, use_tensorboard: bool, progress_bar: bool, initial_step: int = 0):
        self.logger = get_logger()
        self.writer = None
        self.bar = None
        if not dist.is_main():
            return
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if progress_bar:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=initial_step, desc="train", unit="step", dynamic_ncols=True, file=sys.stderr)
            ConsoleHandler.bar_shown = True

    def scalars(self, step: int, values: dict[str, float], prefix: str = "") -> None:
        """One TensorBoard scalar per key (e.g. 'train/gene_mask/loss') and one log line."""
        if not dist.is_main():
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(f"{prefix}{key}", value, step)
        text = " ".join(f"{key}={_fmt(value)}" for key, value in values.items())
        self.logger.info("step %d %s%s", step, prefix, text)

    def advance(self, steps: int, postfix: dict[str, float]) -> None:
        if self.bar is not None:
            self.bar.update(steps)
            if postfix:
                self.bar.set_postfix({k: _fmt(v) for k, v in postfix.items()}, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
            ConsoleHandler.bar_shown = False
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
            self.writer = None


def _fmt(value: float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
