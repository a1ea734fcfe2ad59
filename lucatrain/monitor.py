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

    def __init__(self, run_dir: Path, total_steps: int, use_tensorboard: bool, progress_bar: bool, initial_step: int = 0,
                 wandb: dict | None = None):  # fmt: skip
        """wandb: {"project", "name", "config"} to log to Weights & Biases too (`logger.wandb_project`)."""
        self.logger = get_logger()
        self.writer = None
        self.bar = None
        self.wandb = None
        if not dist.is_main():
            return
        if use_tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        if wandb:
            self.wandb = start_wandb(run_dir, **wandb)
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
        if self.wandb is not None:
            self.wandb.log({f"{prefix}{key}": value for key, value in values.items()}, step=step)
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
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


WANDB_ID = "wandb_run_id"


def start_wandb(run_dir: Path, project: str, name: str, config: dict):
    """A wandb run writing under run_dir/wandb; its id is kept in run_dir/wandb_run_id so that a
    resumed training run goes on logging into the same wandb run (steps it already logged are
    dropped by wandb with a warning)."""
    import uuid

    import wandb

    id_file = Path(run_dir) / WANDB_ID
    run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
    id_file.write_text(run_id + "\n")
    return wandb.init(project=project, name=name or Path(run_dir).name, id=run_id, resume="allow", dir=str(run_dir),
                      config=config)  # fmt: skip


def _fmt(value: float) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
