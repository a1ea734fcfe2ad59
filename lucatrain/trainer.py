"""The training loop: batch -> forward -> loss -> backward -> step -> log -> eval -> save.

Everything DeepSpeed-specific is behind `lucatrain.engine.Engine`; everything task-specific is
behind the Task module (`loss, report = task(batch, totals)`).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lucatrain import dist
from lucatrain.config import Config
from lucatrain.data.batching import BatchSpec, padded_lengths, plan_epoch, rank_micro_batches
from lucatrain.data.collate import EVAL_EPOCH, Collator, MaskingConfig
from lucatrain.data.prepared import PreparedDataset, load_prepared, prepare_or_load
from lucatrain import checkpoint
from lucatrain.checkpoint import maybe_fault, read_valid_manifest
from lucatrain.engine import Engine, convert_to_universal, init_distributed, peak_memory_bytes
from lucatrain.engine import shutdown as engine_shutdown
from lucatrain.export import EXPORT_INFO, split_task_state, write_export
from lucatrain.models.lora import apply_lora
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.data.labels import LabelStats
from lucatrain.models.lucaone_checkpoint import (
    LoadReport,
    is_lucaone_checkpoint,
    load_lucaone_heads,
    model_from_lucaone_checkpoint,
)
from lucatrain.monitor import Monitor, setup_logging
from lucatrain.progress import Ledger
from lucatrain.tasks import TASKS, build_task, metrics_from_sums
from lucatrain.tasks.specs import METRICS
from lucatrain.tasks.plan import TaskPlan, plan_tasks


class MicroBatches(Dataset):
    """Item i = the collated tensors of this rank's micro-batch i of a list of global batches.

    The split of a global batch into this rank's micro-batches is done when the item is fetched,
    so starting (or resuming) an epoch costs nothing per remaining step.
    """

    def __init__(self, data: PreparedDataset, global_batches: list[np.ndarray], collator: Collator, epoch: int,
                 world_size: int = 1, rank: int = 0, accumulation: int = 1):  # fmt: skip
        self.data, self.global_batches, self.collator, self.epoch = data, global_batches, collator, epoch
        self.world_size, self.rank, self.accumulation = world_size, rank, accumulation

    def __len__(self) -> int:
        return len(self.global_batches) * self.accumulation

    def __getitem__(self, i: int) -> dict:
        step, k = divmod(i, self.accumulation)
        rows = rank_micro_batches(self.global_batches[step], self.data.lengths, self.world_size, self.rank, self.accumulation)[k]
        return self.collator(self.data.rows(rows), self.epoch)


def make_loader(dataset: MicroBatches, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset,
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )


def build_model(cfg: Config) -> LucaGPLM:
    """A fresh encoder from the config, or the weights exported at `model.model_dirpath`."""
    return build_model_with_report(cfg)[0]


def build_model_with_report(cfg: Config) -> tuple[LucaGPLM, LoadReport | None]:
    """`build_model`, plus the LoadReport when the weights came from a LucaOne checkpoint (its task
    heads wait there for `load_lucaone_heads`)."""
    m = cfg.model
    if m.model_dirpath and not cfg.train.trained_checkpoint:  # resuming: the checkpoint has the weights
        if is_lucaone_checkpoint(m.model_dirpath):
            model, report = model_from_lucaone_checkpoint(
                m.model_dirpath,
                first_n_layers=m.init_first_n_layers,
                gradient_checkpointing=m.gradient_checkpointing,
                hidden_dropout_prob=m.hidden_dropout_prob,
                attention_probs_dropout_prob=m.attention_probs_dropout_prob,
                **({"num_hidden_layers": m.num_hidden_layers} if m.init_first_n_layers else {}),
            )
            return model, report
        return LucaGPLM.from_pretrained(m.model_dirpath, gradient_checkpointing=m.gradient_checkpointing), None
    config = LucaGPLMConfig(
        hidden_size=m.hidden_size,
        num_hidden_layers=m.num_hidden_layers,
        num_attention_heads=m.num_attention_heads,
        intermediate_size=m.intermediate_size or 4 * m.hidden_size,
        max_position_embeddings=m.max_position_embeddings,
        hidden_dropout_prob=m.hidden_dropout_prob,
        attention_probs_dropout_prob=m.attention_probs_dropout_prob,
        token_dropout=m.token_dropout,
        gradient_checkpointing=m.gradient_checkpointing,
    )
    return LucaGPLM(config), None


def load_data(files: list[str], cfg: Config) -> PreparedDataset:
    """Prepare (rank 0) or reuse the prepared dataset for `files`; other ranks then open it."""
    options = dict(fmt=cfg.data.format, fasta_obj_type=cfg.data.fasta_obj_type, bad_records=cfg.data.bad_records)
    cache_dir = Path(cfg.data.cache_dir).expanduser()
    data, outcome = None, None
    if dist.is_main():
        try:
            data = prepare_or_load(files, cache_dir, **options)
            outcome = ("ok", str(data.path))
        except ValueError as err:  # bad input: every rank must stop with the same message, not hang
            outcome = ("error", err)
    # Other ranks open what rank 0 prepared instead of re-hashing every input file themselves.
    status, payload = dist.broadcast_object(outcome)
    if status == "error":
        raise payload
    return data if data is not None else load_prepared(payload)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


DS_TAG = "ds"  # DeepSpeed's own files live in <checkpoint>/ds/


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


class Trainer:
    def __init__(self, cfg: Config):
        self.cfg = cfg
        init_distributed()
        self.run_dir = Path(cfg.train.output_dir)
        if dist.is_main():
            self.run_dir.mkdir(parents=True, exist_ok=True)
            cfg.save(self.run_dir / "config.yaml")
        dist.barrier()
        self.logger = setup_logging(self.run_dir, cfg.logger.level)
        seed_everything(cfg.train.seed)  # same on every rank: identical initial weights

        self.train_data = load_data(cfg.data.train_files, cfg)
        self.dev_data = load_data(cfg.data.dev_files, cfg) if cfg.data.dev_files else None
        self.plan = self.plan_tasks()
        valid = ["loss"] + [f"{n}/{m}" for n in self.plan.names for m in METRICS[self.plan.output_modes[n]]]
        if cfg.train.best_metric not in valid:
            raise ValueError(f"`train.best_metric={cfg.train.best_metric}` is not a dev metric of this run; choose one of {valid}")
        self.model, lucaone_report = build_model_with_report(cfg)
        num_params = self.model.num_parameters()  # before ZeRO-3 partitions the parameters away
        if cfg.lora.enabled:
            lora = cfg.lora
            self.model = apply_lora(self.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        t = cfg.tasks
        self.task = build_task(self.model, self.plan.names, t.weights, self.plan.num_labels, t.classifier_sizes,
                               t.classifier_dropout, self.plan.output_modes, t.loss_types)  # fmt: skip
        if lucaone_report is not None:
            load_lucaone_heads(lucaone_report, self.task.heads, cfg.model.lucaone_head_tasks or None)
            self.logger.info("initialised from LucaOne checkpoint: %s", lucaone_report.summary())
        self.resume_from = self.find_resume_checkpoint() if cfg.train.trained_checkpoint else None
        written_by = read_valid_manifest(self.resume_from)["world_size"] if self.resume_from else dist.world_size()
        self.engine = Engine(self.task, cfg, load_universal=written_by != dist.world_size())
        masking = MaskingConfig(cfg.tasks.mask_prob, cfg.tasks.mask_token_prob, cfg.tasks.random_token_prob)
        self.collator = Collator(cfg.data.max_length, cfg.data.truncation, masking, cfg.train.seed,
                                 self.plan.label_tasks, self.plan.num_labels, self.plan.output_modes)  # fmt: skip
        # Records of a molecule no trained task scores are left out (a protein-only run on mixed data).
        self.train_rows = _rows_of_types(self.train_data, self.plan.obj_types)
        self.dev_rows = _rows_of_types(self.dev_data, self.plan.obj_types) if self.dev_data else None

        self.world_size, self.rank = dist.world_size(), dist.rank()
        self.accumulation = cfg.train.gradient_accumulation_steps
        self.spec = BatchSpec(
            micro_batches_per_step=self.world_size * self.accumulation,
            batch_size=cfg.train.batch_size,
            max_tokens=cfg.data.max_tokens,
            max_length=cfg.data.max_length,
            sort_pool_size=cfg.data.bucket_size * self.world_size * self.accumulation * max(1, cfg.train.batch_size),
        )
        self.global_step = 0
        self.best_metric: float | None = None
        self.ledger = Ledger()
        self.history: list[dict] = []  # every logged window of this process, for tests and plots
        self.logger.info(
            "world_size=%d params=%.2fM (+%.2fM in task heads) train_records=%d dev_records=%d zero_stage=%d precision=%s",
            self.world_size,
            num_params / 1e6,
            sum(p.numel() for p in self.task.heads.parameters()) / 1e6,
            len(self.train_rows),
            len(self.dev_rows) if self.dev_data else 0,
            self.engine.zero_stage,
            cfg.deepspeed.precision,
        )
        if self.resume_from is not None:
            self.restore(self.resume_from, written_by)

    def plan_tasks(self) -> TaskPlan:
        """The tasks this run trains (`tasks.plan`), checked against the label files and the data."""
        cfg = self.cfg
        stats = LabelStats(self.train_data.meta.get("labels"))
        dev_stats = LabelStats(self.dev_data.meta.get("labels")) if self.dev_data else None
        plan = plan_tasks(cfg.tasks.selected(), cfg.tasks.label_dir, cfg.data.train_files, stats, dev_stats,
                          cfg.tasks.output_modes)  # fmt: skip
        if not dist.is_main():
            return plan
        self.logger.info("tasks: %s", ", ".join(f"{n} ({plan.num_labels[n]} labels)" if n in plan.num_labels else n
                                                 for n in plan.names))  # fmt: skip
        for name, why in plan.dropped.items():
            self.logger.warning("task %s is not trained: %s", name, why)
        if plan.unknown_label_keys:
            self.logger.warning("label entries that name no task are ignored: %s (tasks: %s)",
                                plan.unknown_label_keys, list(TASKS))  # fmt: skip
        return plan

    # ------------------------------------------------------------------ data stream

    def epoch_plan(self, epoch: int, exclude_ids: np.ndarray | None = None) -> list[np.ndarray]:
        """Global batches (row indices) of `epoch` over the trainable rows not in `exclude_ids`."""
        data, rows = self.train_data, self.train_rows
        if exclude_ids is not None and len(exclude_ids):
            rows = rows[~np.isin(data.sample_ids[rows], exclude_ids)]  # by id column only: no record is read
        batches = plan_epoch(data.lengths[rows], self.spec, self.cfg.train.seed, epoch, data.fingerprint)
        return [rows[b] for b in batches]

    def epoch_order(self, epoch: int) -> tuple[list[np.ndarray], int, dict]:
        """(global batches still to run in `epoch`, the order position they start at, the order key).

        An epoch's order is `prefix` already-consumed samples followed by a plan of every other row;
        prefix is 0 unless a resume found the data or the batch definition changed mid-epoch, in which
        case the samples consumed so far are excluded from a fresh plan of the rest.
        """
        key = {"seed": self.cfg.train.seed, "fingerprint": self.train_data.fingerprint, **self.spec.order_key(),
               "obj_types": self.plan.obj_types}  # fmt: skip
        ledger = self.ledger
        resuming = ledger.epoch == epoch and ledger.cursor > 0
        if not resuming:
            return self.epoch_plan(epoch), 0, {**key, "prefix": 0}
        same_order = {k: v for k, v in ledger.order_key.items() if k != "prefix"} == key
        prefix = ledger.order_key.get("prefix", 0) if same_order else ledger.cursor
        batches = self.epoch_plan(epoch, ledger.consumed_ids(epoch)[:prefix])
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
            micro_batches = MicroBatches(self.train_data, batches, self.collator, epoch, self.world_size, self.rank, self.accumulation)
            loader = iter(make_loader(micro_batches, self.cfg.data.num_workers))
            for batch in batches:
                yield epoch, batch, position, [next(loader) for _ in range(self.accumulation)]
                position += len(batch)
            epoch += 1
            self.ledger.start_epoch(epoch, {}, self.train_data.fingerprint)

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg.train
        by_epochs = len(self.epoch_plan(0)) * cfg.num_train_epochs if cfg.num_train_epochs else math.inf
        total = int(min(cfg.max_steps or math.inf, by_epochs))
        monitor = Monitor(self.run_dir, total, self.cfg.logger.tensorboard, cfg.progress_bar and dist.is_main(), self.global_step)
        window: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        self.engine.train()
        for epoch, batch, position, micro_batches in self.steps():
            if self.global_step >= total:
                break
            report = self.train_step(micro_batches)
            _accumulate(window, report)
            self.global_step += 1
            window_steps += 1
            # Every rank knows the whole global batch, so the ledger needs no communication.
            step_tokens = int(padded_lengths(self.train_data.lengths[batch], self.cfg.data.max_length).sum())
            self.ledger.record_step(self.global_step, epoch, position, position + len(batch),
                                    self.train_data.sample_ids[batch], step_tokens)  # fmt: skip
            maybe_fault("step", self.global_step)
            stop = self.global_step >= total

            if self.global_step % cfg.loss_logging_steps == 0 or self.global_step == total:
                summed = dist.all_reduce_dict(window, self.engine.device)
                elapsed = time.perf_counter() - window_start
                scalars = metrics_from_sums(summed)
                scalars["loss"] = self.weighted_loss(scalars)
                scalars["lr"] = self.engine.lr()
                scalars["tokens_per_s"] = summed["tokens"] / elapsed
                scalars["samples_per_s"] = summed["samples"] / elapsed
                if self.global_step % cfg.logging_steps == 0 or self.global_step == total:
                    norm = self.engine.grad_norm()
                    if norm is not None:
                        scalars["grad_norm"] = norm
                    scalars["peak_memory_mb"] = peak_memory_bytes() / 2**20
                    scalars["epoch"] = epoch
                monitor.scalars(self.global_step, scalars, prefix="train/")
                monitor.advance(window_steps, {"loss": scalars["loss"], "lr": scalars["lr"], "tok/s": scalars["tokens_per_s"]})
                self.log_history({"step": self.global_step, **scalars})
                window, window_start, window_steps = {}, time.perf_counter(), 0

            if cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.global_step != total:
                self.evaluate_and_export_best(monitor)
            if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step != total:
                self.save_checkpoint()
            if stop:
                break

        self.evaluate_and_export_best(monitor)
        self.save_checkpoint()
        self.export(self.run_dir / "last")
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

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches; returns the summed report."""
        # The loss normaliser: targets per task in this whole step, over all micro-batches and ranks.
        counts: dict[str, float] = {}
        for mb in micro_batches:
            _accumulate(counts, self.task.count_targets(mb))
        totals = dist.all_reduce_dict(counts, self.engine.device)

        summed: dict[str, float] = {}
        for mb in micro_batches:
            loss, report = self.engine(to_device(mb, self.engine.device), totals)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed updates only at the accumulation boundary
            _accumulate(summed, _numbers(report))
            _accumulate(summed, {"tokens": float(mb["num_tokens"]), "samples": float(len(mb["sample_ids"]))})
        return summed

    def weighted_loss(self, metrics: dict[str, float]) -> float:
        """The objective as the optimizer sees it: sum over tasks of weight x per-target mean loss."""
        return sum(w * metrics[f"{n}/loss"] for n, w in self.task.weights.items() if f"{n}/loss" in metrics)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-task dev loss and masked-token accuracy; fixed masks, so numbers compare across steps."""
        if self.dev_data is None or len(self.dev_rows) == 0:
            return {}
        n = len(self.dev_rows)
        per_rank = max(1, math.ceil(n / (self.world_size * self.cfg.train.batch_size)))
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        parts = np.array_split(self.dev_rows, self.world_size * per_rank)
        mine = [p if len(p) else self.dev_rows[:1] for p in parts[self.rank :: self.world_size]]
        empty = [len(p) == 0 for p in parts[self.rank :: self.world_size]]
        self.engine.eval()
        sums: dict[str, float] = {}
        for rows, is_padding in zip(mine, empty):
            batch = to_device(self.collator(self.dev_data.rows(rows), EVAL_EPOCH), self.engine.device)
            local = {k: float(v) for k, v in self.task.count_targets(batch).items()}
            _, report = self.engine(batch, local)
            if not is_padding:
                _accumulate(sums, _numbers(report))
        self.engine.train()
        metrics = metrics_from_sums(dist.all_reduce_dict(sums, self.engine.device))
        metrics["loss"] = self.weighted_loss(metrics)
        return metrics

    def evaluate_and_export_best(self, monitor: Monitor) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        monitor.scalars(self.global_step, metrics, prefix="eval/")
        self.log_history({"step": self.global_step, **{f"eval/{k}": v for k, v in metrics.items()}})
        key = self.cfg.train.best_metric
        if key not in metrics:  # a valid name (checked at start) whose task had no dev targets
            self.logger.warning("the dev set gave no %s at step %d; best/ is not updated", key, self.global_step)
            return
        value = metrics[key]
        higher_is_better = key.endswith(("acc", "f1"))
        better = self.best_metric is None or (value > self.best_metric if higher_is_better else value < self.best_metric)
        if better:
            self.best_metric = value
            self.export(self.run_dir / "best", extra={"step": self.global_step, key: value})

    # ------------------------------------------------------------------ saving

    @property
    def checkpoint_root(self) -> Path:
        return self.run_dir / "checkpoints"

    def save_checkpoint(self) -> None:
        """Stage every rank's shards, barrier, manifest, atomic rename, then `latest` (checkpoint.py)."""
        started = time.perf_counter()
        stage = checkpoint.begin(self.checkpoint_root, self.global_step)
        self.engine.save(stage, DS_TAG, client_state={})
        checkpoint.save_rng_state(stage / "rng" / f"rank{self.rank}.npz")
        if dist.is_main():
            state = {
                "global_step": self.global_step,
                "best_metric": self.best_metric,
                "world_size": self.world_size,
                "train_data": str(self.train_data.path),
                "fingerprint": self.train_data.fingerprint,
                "tasks": self.plan.names,
                "num_labels": self.plan.num_labels,
                "output_modes": self.plan.output_modes,
            }
            (stage / "trainer_state.json").write_text(json.dumps(state, indent=1))
            (stage / EXPORT_INFO).write_text(json.dumps(self.export_info(), indent=1))
            self.ledger.save(stage / "ledger")
        checkpoint.maybe_fault("after_shards", self.global_step)
        path = checkpoint.commit(self.checkpoint_root, self.global_step, self.ledger.summary(), self.cfg.train.save_total_limit)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if dist.is_main() else 0
        self.logger.info(
            "checkpoint %s committed in %.3f s, %d bytes (%d samples consumed)",
            path, time.perf_counter() - started, size, self.ledger.samples_seen,
        )  # fmt: skip

    def find_resume_checkpoint(self) -> Path:
        """`train.trained_checkpoint` resolved, with LucaVirus's meaning of `model_dirpath`."""
        which = self.cfg.train.trained_checkpoint
        model_dir = Path(self.cfg.model.model_dirpath) if self.cfg.model.model_dirpath else None
        if model_dir is not None and checkpoint.read_valid_manifest(model_dir) is not None:
            return model_dir  # model_dirpath names the checkpoint itself (LucaVirus: .../checkpoint-step<N>)
        root = model_dir / "checkpoints" if model_dir is not None and (model_dir / "checkpoints").is_dir() else self.checkpoint_root
        return checkpoint.find_resume_checkpoint(root, which)

    def restore(self, path: Path, written_by: int) -> None:
        """Model, optimizer, scheduler, counters, ledger and RNG from a committed checkpoint."""
        state = json.loads((path / "trainer_state.json").read_text())
        ours = (self.plan.names, self.plan.num_labels, self.plan.output_modes)
        trained = tuple(state.get(k, v) for k, v in zip(("tasks", "num_labels", "output_modes"), ours))
        if trained != ours:
            raise ValueError(
                f"{path} was trained with tasks {trained[0]} (label counts {trained[1]}, modes {trained[2]}); this run "
                f"has {ours[0]} ({ours[1]}, {ours[2]}). Resume with the same tasks and label files, or start a new "
                "run from its export with `model.model_dirpath`."
            )
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
        self.global_step = state["global_step"]
        self.best_metric = state["best_metric"]
        self.ledger = Ledger.load(path / "ledger")
        rng = path / "rng" / f"rank{self.rank}.npz"
        if written_by == self.world_size and rng.exists():
            checkpoint.load_rng_state(rng)
        else:
            seed_everything(self.cfg.train.seed + 7919 * self.global_step + self.rank)
            self.logger.warning("world size %d -> %d: RNG states re-seeded (masks do not use them)", written_by, self.world_size)
        if written_by != self.world_size and dist.is_main():
            shutil.rmtree(load_dir, ignore_errors=True)
        self.logger.info(
            "resumed from %s: step %d, epoch %d, %d samples consumed (cursor %d)",
            path, self.global_step, self.ledger.epoch, self.ledger.samples_seen, self.ledger.cursor,
        )  # fmt: skip

    def export_info(self) -> dict:
        """What an export needs besides the weights: encoder config, heads and their labels, LoRA."""
        heads = {
            name: {
                "level": TASKS[name].level,
                "output_mode": self.task.modes[name],
                "loss_type": self.task.loss_types[name],
                "molecule": "gene" if TASKS[name].obj_type == 0 else "prot",
                "classifier_size": head.hidden_layer.out_features,
                "num_outputs": head.classifier.out_features,
                "weight": self.task.weights[name],
                "labels": self.plan.label_names.get(name),
            }
            for name, head in self.task.heads.items()
        }
        lora = self.cfg.lora
        return {"encoder_config": self.model.config.to_dict(), "heads": heads,
                "lora": {"enabled": lora.enabled, "r": lora.r, "alpha": lora.alpha}}  # fmt: skip

    def export(self, directory: Path, extra: dict | None = None) -> None:
        """Encoder (transformers-loadable) and task heads, see `lucatrain.export` (collective: gathers ZeRO shards)."""
        state = self.engine.full_state_dict(self.task)
        if dist.is_main():
            info = self.export_info()
            encoder, heads = split_task_state(state, info["lora"])
            write_export(directory, self.model.config, encoder, heads, info["heads"])
            trainer_info = {"global_step": self.global_step, **(extra or {})}
            (directory / "trainer_state.json").write_text(json.dumps(trainer_info, indent=1))
        dist.barrier()


def _accumulate(into: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + value


def _numbers(report: dict[str, torch.Tensor]) -> dict:
    """A Task report as Python floats (scalars) and numpy arrays (per-label vectors)."""
    return {k: v.item() if v.ndim == 0 else v.detach().cpu().numpy().astype(np.float64) for k, v in report.items()}


def _rows_of_types(data: PreparedDataset, obj_types: list[int]) -> np.ndarray:
    """Row indices of the records whose molecule type is in `obj_types`."""
    return np.flatnonzero(np.isin(data.obj_types, obj_types))


def run_training(cfg: Config) -> dict:
    result = Trainer(cfg).train()
    engine_shutdown()
    return result
