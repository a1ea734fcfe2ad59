"""The training loop: batch -> step -> log -> eval -> save, for any model family.

Everything DeepSpeed-specific is behind `lucatrain.engine.Engine`; everything model-specific is
behind the family (`lucatrain.families`: data recipe, Task, collator, export) and its Task module,
which owns the step (`task.train_step(micro_batches, engine)`) and the evaluation
(`task.evaluate(splits, engine)`). This module knows the ledger, the epoch plan and checkpoints.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lucatrain import checkpoint, dist
from lucatrain.checkpoint import EXPORT_INFO, maybe_fault, read_checkpoint_state, read_valid_manifest
from lucatrain.config import PRIMARY_SPLIT, Config, ConfigError, dev_inputs
from lucatrain.data.batching import BatchSpec, batches_of, padded_lengths, plan_epoch_flat, rank_micro_batches, truncation_summary
from lucatrain.data.prepared import PreparedDataset, load_prepared, prepare_or_load
from lucatrain.engine import Engine, convert_to_universal, init_distributed, peak_memory_bytes
from lucatrain.errors import TrainingDiverged, TrainingInterrupted
from lucatrain.engine import shutdown as engine_shutdown
from lucatrain.families import get_family
from lucatrain.monitor import Monitor, get_logger, setup_logging
from lucatrain.progress import STORE as LEDGER_STORE
from lucatrain.progress import Ledger
from lucatrain.state import write_state
from lucatrain.task import Split, accumulate



class MicroBatches(Dataset):
    """Item i = the collated tensors of this rank's micro-batch i of a list of global batches.

    The split of a global batch into this rank's micro-batches is done when the item is fetched,
    so starting (or resuming) an epoch costs nothing per remaining step.
    """

    def __init__(self, data: PreparedDataset, global_batches: list[np.ndarray], collator, epoch: int,
                 world_size: int = 1, rank: int = 0, accumulation: int = 1, columns=None):  # fmt: skip
        self.data, self.global_batches, self.collator, self.epoch = data, global_batches, collator, epoch
        self.world_size, self.rank, self.accumulation, self.columns = world_size, rank, accumulation, columns

    def __len__(self) -> int:
        return len(self.global_batches) * self.accumulation

    def __getitem__(self, i: int) -> dict:
        step, k = divmod(i, self.accumulation)
        rows = rank_micro_batches(self.global_batches[step], self.data.lengths, self.world_size, self.rank, self.accumulation)[k]
        return self.collator(self.data.rows(rows, self.columns), self.epoch)


def make_loader(dataset: MicroBatches, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )


def load_data(files: list[str], cfg: Config, recipe) -> PreparedDataset:
    """Prepare (rank 0) or reuse the prepared dataset for `files`; other ranks then open it."""
    options = dict(fmt=cfg.data.format, fasta_obj_type=cfg.data.fasta_obj_type, bad_records=cfg.data.bad_records,
                   duplicates=cfg.data.duplicates)  # fmt: skip
    cache_dir = Path(cfg.data.cache_dir).expanduser()
    data, outcome = None, None
    if dist.is_main():
        try:
            data = prepare_or_load(files, cache_dir, recipe, workers=cfg.data.prepare_workers, **options)
            outcome = ("ok", str(data.path))
        except ValueError as err:  # bad input: every rank must stop with the same message, not hang
            outcome = ("error", err)
    # Other ranks open what rank 0 prepared instead of re-hashing every input file themselves.
    status, payload = dist.broadcast_object(outcome)
    if status == "error":
        raise payload
    return data if data is not None else load_prepared(payload)


# What a run writes into its directory. logs/ is not among them: a start that failed leaves only its
# log, and an overwritten run's log stays, with the new run's lines after it.
RUN_ARTIFACTS = ("config.yaml", "tensorboard", "history.jsonl", "checkpoints", "best", "last")


def claim_run_dir(run_dir: Path, resuming: bool, overwrite: bool) -> None:
    """Make `run_dir` this run's, or refuse (every rank raises the same error, nothing is written).

    A directory holding files belongs to another run: continuing it needs `train.trained_checkpoint`,
    starting over needs `train.overwrite_output_dir=true` (HF's name), which deletes that run's
    artifacts first so two runs never mix checkpoints, history or TensorBoard events.
    """
    outcome = None
    if dist.is_main():
        try:
            # logs/ alone is what a start that failed before training left: that directory is still free.
            # (The log of this very start is already open there.)
            taken = run_dir.exists() and (not run_dir.is_dir() or any(p.name != "logs" for p in run_dir.iterdir()))
            if taken and not resuming:
                looks_like_run = run_dir.is_dir() and any((run_dir / name).exists() for name in RUN_ARTIFACTS)
                if not overwrite:
                    raise ValueError(
                        f"{run_dir} already holds {'a run' if looks_like_run else 'files'}; resume it with "
                        "`train.trained_checkpoint=latest` (or `auto`), choose another `train.output_dir`, or start over "
                        "with `train.overwrite_output_dir=true`"
                    )
                if not looks_like_run:
                    raise ValueError(f"{run_dir} holds files but no lucatrain run; `train.overwrite_output_dir` only clears run directories")
                for name in RUN_ARTIFACTS:
                    path = run_dir / name
                    if path.is_dir():
                        shutil.rmtree(path)
                    elif path.exists():
                        path.unlink()
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # read-only file system, a file in the way, ...
            outcome = ValueError(f"`train.output_dir={run_dir}` cannot be used: {err}")
        except ValueError as err:
            outcome = err
    outcome = dist.broadcast_object(outcome)
    if outcome is not None:
        raise outcome


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DS_TAG = "ds"  # DeepSpeed's own files live in <checkpoint>/ds/


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed()
        self.run_dir = Path(cfg.train.output_dir)
        # The log comes first, so every later start-up error and warning is in logs/training.log too
        # (a batch job's stderr may be lost); logs/ alone does not make a directory "taken".
        try:
            self.logger = setup_logging(self.run_dir, cfg.logger.level)
        except OSError as err:  # read-only file system, a file where a directory should be, ...
            raise ValueError(f"`train.output_dir={self.run_dir}` cannot be used: {err}") from None
        which = cfg.train.trained_checkpoint
        # 'auto': resume when a complete checkpoint exists; otherwise start afresh, clearing what an
        # attempt that never reached its first checkpoint left (its history would mix with ours).
        self.resume_from = self.find_resume_checkpoint() if which and which != "auto" else None
        if which == "auto":
            self.resume_from = self.find_resume_checkpoint(missing_ok=True)
        claim_run_dir(self.run_dir, resuming=self.resume_from is not None,
                      overwrite=cfg.train.overwrite_output_dir or which == "auto")  # fmt: skip
        if which == "auto" and self.resume_from is None:
            self.logger.info("train.trained_checkpoint=auto: no complete checkpoint under %s; starting a new run", self.checkpoint_root)
        seed_everything(cfg.train.seed)  # same on every rank: identical initial weights

        self.family = get_family(cfg.model.model_type)(cfg, self.logger)
        self.train_data = load_data(cfg.data.train_files, cfg, self.family.prepare_recipe())
        self.dev_data = {name: load_data(files, cfg, self.family.prepare_recipe(name)) for name, files in dev_inputs(cfg).items()}
        self.family.setup(self.train_data, self.dev_data)
        if self.resume_from is not None:  # refuse an incompatible checkpoint before building anything
            self.resume_state = read_checkpoint_state(self.resume_from)
            self.check_resume(self.resume_from, self.resume_state)
        self.task = self.family.build_task(self.resume_from)
        self.metrics = self.task.metrics()
        self.best_split, self.best_key = self.resolve_best_metric(cfg.train.best_metric)
        self.callbacks = self.family.callbacks(self.task) + self.generic_callbacks()
        names = [callback.name for callback in self.callbacks]
        if len(set(names)) != len(names):
            raise ValueError(f"family {self.family.name}: callbacks need distinct names (their checkpoint state is keyed by them), got {names}")
        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.spec = BatchSpec(
            micro_batches_per_step=self.world_size * self.accumulation,
            batch_size=cfg.train.batch_size,
            max_tokens=cfg.data.max_tokens,
            max_length=cfg.data.max_length,
            sort_pool_size=cfg.data.bucket_size * self.world_size * self.accumulation * max(1, cfg.train.batch_size),
        )
        self.train_rows = self.family.trainable_rows(self.train_data)
        self._last_plan: tuple[int, list[np.ndarray]] | None = None  # (epoch, its plan): see epoch_plan
        self.last_step = self.planned_steps()
        if self.last_step == 0:
            raise ValueError(f"no step to train: the {len(self.train_rows)} trainable samples of {cfg.data.train_files} make no "
                             f"complete global batch of {self.spec.micro_batches_per_step} x {cfg.train.batch_size} "
                             "(processes x accumulation x train.batch_size); lower train.batch_size")  # fmt: skip
        if cfg.train.warmup_steps > self.last_step:
            raise ConfigError(f"`train.warmup_steps` ({cfg.train.warmup_steps}) exceeds the run's {self.last_step} steps "
                              f"(train.max_steps={cfg.train.max_steps}, train.num_train_epochs={cfg.train.num_train_epochs})")  # fmt: skip
        written_by = read_valid_manifest(self.resume_from)["world_size"] if self.resume_from else dist.world_size()
        self.engine = Engine(self.task, cfg, load_universal=written_by != dist.world_size(), schedule_steps=self.schedule_length(),
                             after_step=[callback.after_step for callback in self.callbacks])  # fmt: skip
        if dist.is_main():  # only now: the config, the data and the model have all been accepted
            cfg.save(self.run_dir / "config.yaml")
        self.collator = self.family.collator()
        self.columns = self.family.columns()
        self.dev_splits = {}
        for name, data in self.dev_data.items():
            rows = self.family.trainable_rows(data)
            if len(rows):
                self.dev_splits[name] = Split(name, data, rows, self.collator, cfg.train.batch_size, self.columns)

        self.global_step = 0
        self.last_evaluated = -1
        self.last_saved = -1
        self.stop_signal: int | None = None  # set by the SIGTERM/SIGINT handler while training
        self.lowest_loss: float | None = None  # of the logged training loss, for the divergence guard
        self.consecutive_skips = 0  # steps in a row whose update train.nonfinite=skip dropped
        self.monitor: Monitor | None = None
        self.best_metric: float | None = None
        self.ledger = Ledger()
        self.history: list[dict] = []  # every logged window of this process, for tests and plots
        self.logger.info(
            "world_size=%d %s train_records=%d dev_records=%d zero_stage=%d precision=%s",
            self.world_size,
            self.family.describe(),
            len(self.train_rows),
            sum(len(split.rows) for split in self.dev_splits.values()),
            self.engine.zero_stage,
            cfg.deepspeed.precision,
        )
        every_row = self.train_rows.size == len(self.train_data)  # then no gather (see epoch_plan)
        lengths = self.train_data.lengths if every_row else self.train_data.lengths[self.train_rows]
        cut = truncation_summary(lengths, cfg.data.max_length, cfg.data.truncation)
        if cut and dist.is_main():
            self.logger.info("training data: %s", cut)
        if self.resume_from is not None:
            self.restore(self.resume_from, written_by)

    def resolve_best_metric(self, key: str) -> tuple[str | None, str]:
        """`train.best_metric` as (dev split, metric): '<metric>' of the first split, or '<split>/<metric>'."""
        splits = list(dev_inputs(self.cfg))
        primary = splits[0] if splits else None
        valid = list(self.metrics) + [f"{s}/{m}" for s in splits if s != PRIMARY_SPLIT for m in self.metrics]
        if key not in valid:
            raise ValueError(f"`train.best_metric={key}` is not a dev metric of this run; choose one of {valid}")
        for split in splits:
            if split != PRIMARY_SPLIT and key.startswith(f"{split}/") and key[len(split) + 1 :] in self.metrics:
                return split, key[len(split) + 1 :]
        return primary, key

    # ------------------------------------------------------------------ data stream

    def generic_callbacks(self) -> list:
        """`train.early_stopping` (its metric resolved as `train.best_metric` is) and `train.callbacks`."""
        from lucatrain.callbacks import EarlyStopping, load_callback

        stopping = self.cfg.train.early_stopping
        callbacks = []
        if stopping.monitor:
            try:
                split, metric = self.resolve_best_metric(stopping.monitor)
            except ValueError as err:
                raise ValueError(str(err).replace("train.best_metric", "train.early_stopping.monitor")) from None
            higher = self.metrics[metric].higher_is_better if stopping.mode == "auto" else stopping.mode == "max"
            callbacks.append(EarlyStopping(split, metric, higher, stopping.patience, stopping.min_delta))
        return callbacks + [load_callback(path) for path in self.cfg.train.callbacks]

    def schedule_length(self) -> int:
        """The optimizer step at which the LR schedule ends: train.schedule_steps, else
        train.schedule_epochs epochs of steps, else the run's last step."""
        t = self.cfg.train
        if t.schedule_steps:
            return t.schedule_steps
        if t.schedule_epochs:
            return max(1, round(t.schedule_epochs * len(self.epoch_plan(0))))
        return self.last_step

    def planned_steps(self) -> int:
        """The run's last step: `train.max_steps`, or `train.num_train_epochs` epochs of global
        batches at this run's world size, whichever comes first (the LR schedule ends there)."""
        cfg = self.cfg.train
        by_epochs = len(self.epoch_plan(0)) * cfg.num_train_epochs if cfg.num_train_epochs else math.inf
        return int(min(cfg.max_steps or math.inf, by_epochs))

    def epoch_plan(self, epoch: int, exclude_ids: np.ndarray | None = None) -> list[np.ndarray]:
        """Global batches (row indices) of `epoch` over the trainable rows not in `exclude_ids`.

        The plan of a whole epoch is kept for the next call: the step count, the LR schedule and
        the first epoch all ask for epoch 0's (at 10 M records each plan costs about a second).
        """
        whole_epoch = exclude_ids is None or not len(exclude_ids)
        if whole_epoch and self._last_plan is not None and self._last_plan[0] == epoch:
            return self._last_plan[1]
        data, rows = self.train_data, self.train_rows
        if not whole_epoch:
            rows = data.rows_without(rows, exclude_ids)
        every_row = rows.size == len(data)  # trainable_rows are sorted and distinct: then they are 0..N-1
        order, ends = plan_epoch_flat(data.lengths if every_row else data.lengths[rows], self.spec, self.cfg.train.seed,
                                      epoch, data.fingerprint)  # fmt: skip
        # One gather of every planned row, then views of it: a million small gathers cost seconds.
        plan = batches_of(order if every_row else rows[order], ends)
        if whole_epoch:
            self._last_plan = (epoch, plan)
        return plan

    def epoch_order(self, epoch: int) -> tuple[list[np.ndarray], int, dict]:
        """(global batches still to run in `epoch`, the order position they start at, the order key).

        An epoch's order is `prefix` already-consumed samples followed by a plan of every other row;
        prefix is 0 unless a resume found the data or the batch definition changed mid-epoch, in which
        case the samples consumed so far are excluded from a fresh plan of the rest.
        """
        key = {"seed": self.cfg.train.seed, "fingerprint": self.train_data.fingerprint, **self.spec.order_key(),
               **self.family.order_key()}  # fmt: skip
        key = json.loads(json.dumps(key))  # as the checkpoint stores it (tuples become lists), so the two compare
        ledger = self.ledger
        resuming = ledger.epoch == epoch and ledger.cursor > 0
        if not resuming:
            return self.epoch_plan(epoch), 0, {**key, "prefix": 0}
        same_order = {k: v for k, v in ledger.order_key.items() if k != "prefix"} == key
        prefix = ledger.order_key.get("prefix", 0) if same_order else ledger.cursor
        batches = self.epoch_plan(epoch, ledger.consumed_ids(epoch, prefix))  # prefix 0: no segment is read
        position = prefix
        for i, batch in enumerate(batches):
            if position == ledger.cursor:
                if not same_order:
                    self.logger.warning(
                        "resume: the data or the global batch definition changed (%s -> %s); the %d samples "
                        "already consumed in epoch %d are skipped by id, %d remain",
                        ledger.order_key, key, prefix, epoch, sum(len(b) for b in batches),
                    )
                return batches[i:], position, {**key, "prefix": prefix}
            position += len(batch)
        # The cursor falls inside a global batch of the recomputed plan: re-plan the rest by id.
        return self.epoch_order_excluding_all(epoch, key)

    def epoch_order_excluding_all(self, epoch: int, key: dict) -> tuple[list[np.ndarray], int, dict]:
        prefix = self.ledger.cursor
        return self.epoch_plan(epoch, self.ledger.consumed_ids(epoch)), prefix, {**key, "prefix": prefix}

    def steps(self):
        """Yield (epoch, global batch rows, order start, this rank's micro-batch tensors) per step.

        Resuming starts at the ledger's cursor: batches before it are never read or collated.
        """
        cfg = self.cfg.train
        max_epochs = cfg.num_train_epochs if cfg.num_train_epochs > 0 else math.inf
        epoch = self.ledger.epoch
        while epoch < max_epochs:
            batches, position, key = self.epoch_order(epoch)
            self.ledger.start_epoch(epoch, key, self.train_data.fingerprint)
            if epoch == 0 and position == 0 and not batches:
                raise ValueError(
                    f"the training set ({len(self.train_rows)} records) is smaller than one global batch "
                    f"({self.spec.micro_batches_per_step} micro-batches); lower train.batch_size or add data"
                )
            micro_batches = MicroBatches(self.train_data, batches, self.collator, epoch, self.world_size, self.rank,
                                         self.accumulation, self.columns)  # fmt: skip
            # Starting a DataLoader iterator draws its workers' base seed from torch's global RNG. A
            # resumed run starts its iterator at another moment than the uninterrupted run did, so that
            # draw would shift every later dropout mask; the state is put back to keep them aligned.
            rng = torch.get_rng_state()
            loader = iter(make_loader(micro_batches, self.cfg.data.num_workers))
            torch.set_rng_state(rng)
            for batch in batches:
                yield epoch, batch, position, [next(loader) for _ in range(self.accumulation)]
                position += len(batch)
            epoch += 1
            self.ledger.start_epoch(epoch, {}, self.train_data.fingerprint)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        """Train to the end, or until SIGTERM/SIGINT (a scheduler's notice, Ctrl-C): the current
        optimizer step finishes, a checkpoint is committed, and `TrainingInterrupted` is raised. A
        second signal ends the process at once."""
        def note(signum, frame):
            self.stop_signal = signum
            signal.signal(signum, signal.SIG_DFL)

        on_main_thread = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
        previous = {signum: signal.signal(signum, note) for signum in (signal.SIGTERM, signal.SIGINT)} if on_main_thread else {}
        try:
            return self._train()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            if self.monitor is not None:  # a failed run too: the bar goes, log lines are plain again
                self.monitor.close()

    def _train(self) -> dict:
        cfg = self.cfg.train
        total = self.last_step
        if self.resume_from is not None and self.global_step >= total:
            # Nothing to do; re-saving would rewrite a finished run's checkpoint and exports.
            self.logger.warning(
                "resumed at step %d, which already reaches this run's last step %d (train.max_steps=%d, "
                "train.num_train_epochs=%d): nothing to train; checkpoints and exports are left as they are. "
                "Raise train.max_steps to train on.", self.global_step, total, cfg.max_steps, cfg.num_train_epochs,
            )  # fmt: skip
            return {"history": [], "global_step": self.global_step}
        logger_cfg = self.cfg.logger
        wandb = {"project": logger_cfg.wandb_project, "name": logger_cfg.wandb_name, "config": self.cfg.to_dict()} if logger_cfg.wandb_project else None
        monitor = self.monitor = Monitor(self.run_dir, total, logger_cfg.tensorboard, cfg.progress_bar and dist.is_main(), self.global_step,
                                         wandb=wandb)  # fmt: skip
        window: dict[str, float] = {}
        window_start, window_steps, window_samples, window_tokens = time.perf_counter(), 0, 0, 0
        for callback in self.callbacks:
            callback.on_start(self)
        self.engine.train()
        for epoch, batch, position, micro_batches in self.steps():
            if self.global_step >= total:
                break
            skipped_before = self.engine.skipped_steps
            report = self.train_step(micro_batches)
            interrupted, applied = self.check_step(report, self.global_step + 1, skipped_before)
            if applied:  # a skipped step's values are not finite, or not of an update
                accumulate(window, report)
            self.global_step += 1
            window_steps += 1
            # Every rank knows the whole global batch, so the ledger needs no communication.
            step_tokens = int(padded_lengths(self.train_data.lengths[batch], self.cfg.data.max_length).sum())
            self.ledger.record_step(self.global_step, epoch, position, position + len(batch),
                                    self.train_data.sample_ids[batch], step_tokens)  # fmt: skip
            window_samples, window_tokens = window_samples + len(batch), window_tokens + step_tokens
            maybe_fault("step", self.global_step)
            stop = self.global_step >= total

            if self.global_step % cfg.loss_logging_steps == 0 or self.global_step == total:
                summed = dist.all_reduce_dict(window, self.engine.device)
                elapsed = time.perf_counter() - window_start
                scalars = self.task.summarize(summed) if summed else {}  # empty: every step of the window was skipped
                scalars["lr"] = self.engine.lr()
                scalars["tokens_per_s"] = window_tokens / elapsed  # tokens: the `length` column, as batching counts them
                scalars["samples_per_s"] = window_samples / elapsed
                if self.global_step % cfg.logging_steps == 0 or self.global_step == total:
                    norm = self.engine.grad_norm()
                    if norm is not None:
                        scalars["grad_norm"] = norm
                    scalars["peak_memory_mb"] = peak_memory_bytes() / 2**20
                    scalars["epoch"] = epoch
                monitor.scalars(self.global_step, scalars, prefix="train/")
                shown = {"loss": scalars.get("loss", math.nan), "lr": scalars["lr"], "tok/s": scalars["tokens_per_s"]}
                monitor.advance(window_steps, shown)
                self.log_history({"step": self.global_step, **scalars})
                self.check_divergence(scalars.get("loss"))
                window, window_start, window_steps, window_samples, window_tokens = {}, time.perf_counter(), 0, 0, 0

            periodic = cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.global_step > cfg.eval_start_step
            if periodic and self.global_step != total:
                if self.evaluate_and_export_best(monitor):
                    self.logger.info("a callback stopped training after the evaluation at step %d", self.global_step)
                    break
            if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step != total:
                self.save_checkpoint()
            if interrupted:
                self.stop_after_signal(monitor)
            if stop:
                break

        if self.last_evaluated != self.global_step:
            self.evaluate_and_export_best(monitor)
        self.save_checkpoint()
        self.export(self.run_dir / "last")
        for callback in self.callbacks:
            callback.on_end(self)
        monitor.close()
        self.logger.info(
            "done: %d steps, %d samples, %d tokens -> %s",
            self.global_step, self.ledger.samples_seen, self.ledger.tokens_seen, self.run_dir,
        )  # fmt: skip
        return {"history": self.history, "global_step": self.global_step}

    def log_history(self, entry: dict) -> None:
        """Append to history.jsonl as we go, so a killed run keeps its curve."""
        self.history.append(entry)
        if dist.is_main():
            with open(self.run_dir / "history.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry) + "\n")

    def check_step(self, report: dict, step: int, skipped_before: int) -> tuple[bool, bool]:
        """After every step, on every rank (one all-reduce of two flags, so all ranks decide alike).

        A report value or gradient norm that is not finite stops the run before anything is saved
        (this step's update is applied, so nothing of this run is committed from here on), unless
        `train.nonfinite=skip` and DeepSpeed dropped the update: the step is then logged as skipped,
        up to `train.max_consecutive_skips` in a row. Returns (a rank received SIGTERM or SIGINT,
        the update was applied)."""
        skipped = self.engine.skipped_steps > skipped_before  # DeepSpeed's overflow decision: the same on every rank
        bad = sorted(k for k, v in report.items() if not np.all(np.isfinite(v)))
        norm = self.engine.grad_norm()
        # Under fp16 a skipped step is the loss scaler's routine (it lowers its scale); under bf16 DeepSpeed
        # skips only when it found gradients that are not finite.
        scaler_skip = skipped and self.cfg.deepspeed.precision == "fp16"
        if (skipped or (norm is not None and not math.isfinite(norm))) and not scaler_skip:
            bad.append("grad_norm")
        flags = dist.all_reduce_dict({"bad": float(len(bad)), "signal": float(self.stop_signal is not None)}, self.engine.device)
        interrupted = flags["signal"] > 0
        if skipped:
            self.engine.advance_schedule()
        if flags["bad"] == 0:
            if not skipped:
                self.consecutive_skips = 0
            return interrupted, not skipped
        tasks = sorted({key.split("/")[0] for key in bad if "/" in key})
        what = f"step {step}: non-finite {', '.join(bad) or 'values on another rank'}" + (f" (task {', '.join(tasks)})" if tasks else "")
        if not skipped or self.cfg.train.nonfinite != "skip":
            self.diverged(what)
        self.consecutive_skips += 1
        limit = self.cfg.train.max_consecutive_skips
        if self.consecutive_skips >= limit:
            self.diverged(f"{what}, {limit} skipped steps in a row (train.max_consecutive_skips)")
        self.logger.warning("%s; the update was skipped (train.nonfinite=skip): weights and optimizer state are unchanged, "
                            "its samples count as consumed", what)  # fmt: skip
        self.log_history({"step": step, "skipped": what})
        return interrupted, False

    def stop_after_signal(self, monitor: Monitor) -> None:
        """SIGTERM/SIGINT: the step is done; commit it (unless just saved) and end with an error."""
        if self.last_saved != self.global_step:
            self.save_checkpoint()
        monitor.close()
        name = signal.Signals(self.stop_signal).name if self.stop_signal else "a signal on another rank"
        message = (f"stopped by {name} after step {self.global_step}: checkpoint {checkpoint.checkpoint_name(self.global_step)} "
                   "is committed; resume with train.trained_checkpoint=latest (or auto)")  # fmt: skip
        self.logger.warning(message)
        raise TrainingInterrupted(message, self.stop_signal or signal.SIGTERM)

    def check_divergence(self, loss: float | None) -> None:
        """Stop when the logged loss has grown past `train.divergence_factor` times its lowest value."""
        factor = self.cfg.train.divergence_factor
        if loss is None or not factor:
            return
        if not math.isfinite(loss):
            self.diverged(f"step {self.global_step}: the training loss is {loss}")
        self.lowest_loss = loss if self.lowest_loss is None else min(self.lowest_loss, loss)
        if loss > factor * self.lowest_loss:
            self.diverged(f"step {self.global_step}: the training loss {loss:.4g} is over {factor:g} times its lowest "
                          f"{self.lowest_loss:.4g} (train.divergence_factor)")  # fmt: skip

    def diverged(self, what: str) -> None:
        latest = self.checkpoint_root / checkpoint.LATEST
        kept = f"the last checkpoint, {latest.read_text().strip()}, is kept" if latest.exists() else "no checkpoint was written"
        message = (f"training diverged at {what}; nothing of it is saved or exported ({kept}). Resume from the last "
                   "checkpoint with a lower train.learning_rate (train.trained_checkpoint=latest), or check the data")  # fmt: skip
        self.logger.error(message)
        raise TrainingDiverged(message)

    def train_step(self, micro_batches: list[dict]) -> dict:
        """One optimizer step over this rank's micro-batches (the Task owns it); the summed report."""
        return self.task.train_step(micro_batches, self.engine)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, dict[str, float]]:
        """Metrics of every dev split, by split name (empty without dev data)."""
        if not self.dev_splits:
            return {}
        return self.task.evaluate(self.dev_splits, self.engine)

    def evaluate_and_export_best(self, monitor: Monitor) -> bool:
        """Evaluate, log, update best/; True when a callback asks to stop (e.g. early stopping)."""
        results = self.evaluate()
        self.last_evaluated = self.global_step
        if not results:
            return False
        for callback in self.callbacks:  # metric callbacks add their values before anything is logged
            for split, extra in (callback.metrics(self, results) or {}).items():
                results.setdefault(split, {}).update(extra)
        logged = {}
        for name, metrics in results.items():
            prefix = "eval/" if name == PRIMARY_SPLIT else f"eval/{name}/"
            monitor.scalars(self.global_step, metrics, prefix=prefix)
            logged.update({f"{prefix}{k}": v for k, v in metrics.items()})
        self.log_history({"step": self.global_step, **logged})
        key = self.cfg.train.best_metric
        value = results.get(self.best_split, {}).get(self.best_key)
        if value is None:  # a valid name (checked at start) whose task had no dev targets
            self.logger.warning("the dev set gave no %s at step %d; best/ is not updated", key, self.global_step)
        elif self.metrics[self.best_key].better(value, self.best_metric):
            self.best_metric = value
            self.export(self.run_dir / "best", extra={"step": self.global_step, key: value})
        # Every callback sees every evaluation (no short-circuit), and all ranks decide alike.
        stops = [callback.after_evaluate(results) for callback in self.callbacks]
        return any(stops)

    # ------------------------------------------------------------------ saving

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        """Stage every rank's shards, barrier, manifest, atomic rename, then `latest` (checkpoint.py)."""
        started = time.perf_counter()
        self.last_saved = self.global_step
        stage = checkpoint.begin(self.checkpoint_root, self.global_step)
        self.engine.save(stage, DS_TAG, client_state={})
        checkpoint.save_rng_state(stage / "rng" / f"rank{self.rank}.npz")
        if dist.is_main():
            write_state(stage / "state", self.state_dict())  # writes the ledger's new segments
            (stage / EXPORT_INFO).write_text(json.dumps(self.export_info(), indent=1))
        else:  # the same segments, recorded without writing: every rank's ledger stays in step
            self.ledger.state_dict(self.checkpoint_root / LEDGER_STORE, write=False)
        checkpoint.maybe_fault("after_shards", self.global_step)
        path = checkpoint.commit(self.checkpoint_root, self.global_step, self.ledger.summary(), self.cfg.train.save_total_limit)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if dist.is_main() else 0
        self.logger.info(
            "checkpoint %s committed in %.3f s, %d bytes (%d samples consumed)",
            path, time.perf_counter() - started, size, self.ledger.samples_seen,
        )  # fmt: skip
        for callback in self.callbacks:
            callback.after_save(path)

    def find_resume_checkpoint(self, missing_ok: bool = False) -> Path | None:
        """`train.trained_checkpoint` resolved on rank 0 (which verifies the checksums of the one it
        picks) and sent to every rank, or the same error raised on every rank."""
        outcome = None
        if dist.is_main():
            try:
                outcome = ("ok", self._find_resume_checkpoint(missing_ok))
            except ValueError as err:
                outcome = ("error", err)
        status, payload = dist.broadcast_object(outcome)
        if status == "error":
            raise payload
        return payload

    def _find_resume_checkpoint(self, missing_ok: bool) -> Path | None:
        """`train.trained_checkpoint` resolved, with LucaVirus's meaning of `model_dirpath`; with
        `missing_ok` ('auto'), None when there is no complete checkpoint yet."""
        which = self.cfg.train.trained_checkpoint
        model_dir = Path(self.cfg.model.model_dirpath) if self.cfg.model.model_dirpath else None
        if model_dir is not None and checkpoint.read_valid_manifest(model_dir) is not None:
            return model_dir  # model_dirpath names the checkpoint itself (LucaVirus: .../checkpoint-step<N>)
        root = model_dir / "checkpoints" if model_dir is not None and (model_dir / "checkpoints").is_dir() else self.checkpoint_root
        if missing_ok:
            if not checkpoint.committed(root) and not (root / checkpoint.LATEST).exists():
                return None
            try:
                return checkpoint.find_resume_checkpoint(root, "latest")
            except ValueError:  # only incomplete checkpoints (each named in a warning)
                return None
        return checkpoint.find_resume_checkpoint(root, which)

    def state_dict(self) -> dict:
        """Everything but the weights and RNG that a resume needs, in one dict (`lucatrain.state`)."""
        return {
            "trainer": {
                "global_step": self.global_step,
                "best_metric": self.best_metric,
                "best_metric_name": self.cfg.train.best_metric,
                "world_size": self.world_size,
                "family": self.family.name,
                "train_data": str(self.train_data.path),
                "fingerprint": self.train_data.fingerprint,
            },
            "family": self.family.resume_state(),
            "task": self.task.run_state(),
            "callbacks": {callback.name: callback.state_dict() for callback in self.callbacks},
            "ledger": self.ledger.state_dict(self.checkpoint_root / LEDGER_STORE),
        }

    def load_state_dict(self, state: dict, where: str = "checkpoint") -> None:
        trainer = state["trainer"]
        self.global_step = trainer["global_step"]
        self.best_metric = trainer["best_metric"]
        if trainer.get("best_metric_name", self.cfg.train.best_metric) != self.cfg.train.best_metric:
            # best/ so far was chosen by another metric: its value says nothing about this one.
            self.logger.warning("train.best_metric changed (%s -> %s): best/ is chosen anew from the next evaluation",
                                trainer.get("best_metric_name"), self.cfg.train.best_metric)  # fmt: skip
            self.best_metric = None
        self.task.load_run_state(state.get("task", {}))
        saved_callbacks = state.get("callbacks", {})
        for callback in self.callbacks:
            callback.load_state_dict(saved_callbacks.get(callback.name, {}))
        self.ledger = Ledger.from_state_dict(state["ledger"], where, Path(where).parent / LEDGER_STORE)

    def check_resume(self, path: Path, state: dict) -> None:
        """The checkpoint was written by this family, and the family accepts it for this run."""
        family = state["trainer"].get("family")
        if family != self.family.name:
            raise ValueError(f"{path} was written by a {family} run; this run is {self.family.name} (`model.model_type`)")
        self.family.check_resume(state["family"], path)

    def restore(self, path: Path, written_by: int) -> None:
        """Model, optimizer, scheduler, counters, ledger and RNG from a committed checkpoint."""
        state = self.resume_state
        load_dir = path
        if written_by != self.world_size:
            # ZeRO shards are cut per rank: convert to DeepSpeed's universal form, then load that.
            load_dir = self.checkpoint_root / f".universal-{path.name}"
            if dist.is_main():
                if load_dir.exists():
                    shutil.rmtree(load_dir)
                convert_to_universal(path, DS_TAG, load_dir)
            dist.barrier()
        self.engine.load(load_dir, DS_TAG)
        self.load_state_dict(state, str(path))
        rng = path / "rng" / f"rank{self.rank}.npz"
        if written_by == self.world_size and rng.exists():
            checkpoint.load_rng_state(rng)
        else:
            seed_everything(self.cfg.train.seed + 7919 * self.global_step + self.rank)
            self.logger.warning(
                "world size %d -> %d: the per-rank RNG states (dropout) are re-seeded from (seed, step, rank), so dropout "
                "masks differ from a run that kept %d ranks; the sample stream and the MLM masks (hashed from sample ids) "
                "do not", written_by, self.world_size, written_by,
            )  # fmt: skip
        if written_by != self.world_size and dist.is_main():
            shutil.rmtree(load_dir, ignore_errors=True)
        self.logger.info(
            "resumed from %s: step %d, epoch %d, %d samples consumed (cursor %d)",
            path, self.global_step, self.ledger.epoch, self.ledger.samples_seen, self.ledger.cursor,
        )  # fmt: skip

    def export_info(self) -> dict:
        """The family's export record (config, heads, labels), tagged with the family's name."""
        return {"family": self.family.name, **self.family.export_info(self.task)}

    def export(self, directory: Path, extra: dict | None = None) -> None:
        """What the family exports (collective: gathers ZeRO shards), plus trainer_state.json."""
        state = self.engine.full_state_dict(self.task)
        if dist.is_main():
            self.family.export(directory, state, self.export_info())
            trainer_info = {"global_step": self.global_step, **(extra or {})}
            (directory / "trainer_state.json").write_text(json.dumps(trainer_info, indent=1))
        dist.barrier()


def run_training(cfg: Config) -> dict:
    """One run, start to finish; the reason a run stopped is in logs/training.log as well as on stderr.

    A failed run does not barrier on its way out: the other ranks may be failing too, or stuck in a
    collective the launcher is about to end, and waiting for them could turn a crash into a hang."""
    try:
        result = Trainer(cfg).train()
    except TrainingInterrupted:
        engine_shutdown()  # every rank stopped at the same step: a clean shutdown
        raise
    except BaseException as err:
        if isinstance(err, ValueError) and not isinstance(err, TrainingDiverged) and get_logger().handlers:
            get_logger().error("%s", err)
        raise
    engine_shutdown()
    return result
