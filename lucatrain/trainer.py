"""The training loop: batch -> forward -> loss -> backward -> step -> log -> eval -> save.

Everything DeepSpeed-specific is behind `lucatrain.engine.Engine`; everything task-specific is
behind the Task module (`loss, report = task(batch, totals)`).
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from lucatrain import dist
from lucatrain.config import Config
from lucatrain.data.batching import BatchSpec, plan_epoch, rank_micro_batches
from lucatrain.data.collate import EVAL_EPOCH, Collator, MaskingConfig
from lucatrain.data.prepared import PreparedDataset, load_prepared, prepare_or_load
from lucatrain.engine import Engine, init_distributed, peak_memory_bytes
from lucatrain.models.lora import apply_lora, merge_lora_state_dict
from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig
from lucatrain.monitor import Monitor, setup_logging
from lucatrain.tasks import build_task


class MicroBatches(Dataset):
    """Item i = the collated tensors of micro-batch i (a list of row indices)."""

    def __init__(self, data: PreparedDataset, micro_batches: list[np.ndarray], collator: Collator, epoch: int):
        self.data, self.micro_batches, self.collator, self.epoch = data, micro_batches, collator, epoch

    def __len__(self) -> int:
        return len(self.micro_batches)

    def __getitem__(self, i: int) -> dict:
        return self.collator(self.data.rows(self.micro_batches[i]), self.epoch)


def make_loader(data, micro_batches, collator, epoch, num_workers) -> DataLoader:
    return DataLoader(
        MicroBatches(data, micro_batches, collator, epoch),
        batch_size=None,  # items are whole micro-batches already
        shuffle=False,
        num_workers=num_workers,
        persistent_workers=False,
    )


def build_model(cfg: Config) -> LucaGPLM:
    """A fresh encoder from the config, or the weights exported at `model.model_dirpath`."""
    m = cfg.model
    if m.model_dirpath:
        return LucaGPLM.from_pretrained(m.model_dirpath, gradient_checkpointing=m.gradient_checkpointing)
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
    return LucaGPLM(config)


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
        self.model = build_model(cfg)
        num_params = self.model.num_parameters()  # before ZeRO-3 partitions the parameters away
        if cfg.lora.enabled:
            lora = cfg.lora
            self.model = apply_lora(self.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        self.task = build_task(self.model, cfg.tasks.names, cfg.tasks.weights)
        self.engine = Engine(self.task, cfg)
        masking = MaskingConfig(cfg.tasks.mask_prob, cfg.tasks.mask_token_prob, cfg.tasks.random_token_prob)
        self.collator = Collator(cfg.data.max_length, cfg.data.truncation, masking, cfg.train.seed)

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
        self.epoch = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        self.best_metric: float | None = None
        self.history: list[dict] = []  # every logged window, for tests and plots
        self.logger.info(
            "world_size=%d params=%.2fM train_records=%d dev_records=%d zero_stage=%d precision=%s",
            self.world_size,
            num_params / 1e6,
            len(self.train_data),
            len(self.dev_data) if self.dev_data else 0,
            self.engine.zero_stage,
            cfg.deepspeed.precision,
        )

    # ------------------------------------------------------------------ data stream

    def epoch_plan(self, epoch: int) -> list[np.ndarray]:
        return plan_epoch(self.train_data.lengths, self.spec, self.cfg.train.seed, epoch, self.train_data.fingerprint)

    def steps(self):
        """Yield (epoch, [micro-batch tensors] for this rank) for every optimizer step to run."""
        cfg = self.cfg.train
        max_epochs = cfg.num_train_epochs if cfg.num_train_epochs > 0 else math.inf
        while self.epoch < max_epochs:
            plan = self.epoch_plan(self.epoch)
            if not plan:
                raise ValueError(
                    f"the training set ({len(self.train_data)} records) is smaller than one global batch "
                    f"({self.spec.micro_batches_per_step} micro-batches); lower train.batch_size or add data"
                )
            mine = [rank_micro_batches(b, self.train_data.lengths, self.world_size, self.rank, self.accumulation) for b in plan]
            flat = [mb for step in mine for mb in step]
            loader = iter(make_loader(self.train_data, flat, self.collator, self.epoch, self.cfg.data.num_workers))
            for _ in plan:
                yield self.epoch, [next(loader) for _ in range(self.accumulation)]
            self.epoch += 1

    # ------------------------------------------------------------------ the loop

    def train(self) -> dict:
        cfg = self.cfg.train
        by_epochs = len(self.epoch_plan(0)) * cfg.num_train_epochs if cfg.num_train_epochs else math.inf
        total = int(min(cfg.max_steps or math.inf, by_epochs))
        monitor = Monitor(self.run_dir, total, self.cfg.logger.tensorboard, cfg.progress_bar and dist.is_main())
        window: dict[str, float] = {}
        window_start, window_steps = time.perf_counter(), 0
        self.engine.train()
        for epoch, micro_batches in self.steps():
            _accumulate(window, self.train_step(micro_batches))
            self.global_step += 1
            window_steps += 1

            if self.global_step % cfg.loss_logging_steps == 0 or self.global_step == total:
                summed = dist.all_reduce_dict(window, self.engine.device)
                elapsed = time.perf_counter() - window_start
                scalars = _task_metrics(summed)
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
                self.samples_seen += int(summed["samples"])
                self.tokens_seen += int(summed["tokens"])
                monitor.scalars(self.global_step, scalars, prefix="train/")
                monitor.advance(window_steps, {"loss": scalars["loss"], "lr": scalars["lr"], "tok/s": scalars["tokens_per_s"]})
                self.history.append({"step": self.global_step, **scalars})
                window, window_start, window_steps = {}, time.perf_counter(), 0

            if cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.global_step != total:
                self.evaluate_and_export_best(monitor)
            if cfg.save_steps and self.global_step % cfg.save_steps == 0 and self.global_step != total:
                self.save_checkpoint()
            if cfg.max_steps and self.global_step >= cfg.max_steps:
                break

        self.evaluate_and_export_best(monitor)
        self.save_checkpoint()
        self.export(self.run_dir / "last")
        monitor.close()
        if dist.is_main():
            (self.run_dir / "history.json").write_text(json.dumps(self.history, indent=1))
        self.logger.info("done: %d steps, %d samples, %d tokens -> %s", self.global_step, self.samples_seen, self.tokens_seen, self.run_dir)
        return {"history": self.history, "global_step": self.global_step}

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
            _accumulate(summed, {k: float(v) for k, v in report.items()})
            _accumulate(summed, {"tokens": float(mb["num_tokens"]), "samples": float(len(mb["sample_ids"]))})
        return summed

    def weighted_loss(self, metrics: dict[str, float]) -> float:
        """The objective as the optimizer sees it: sum over tasks of weight x per-target mean loss."""
        return sum(w * metrics[f"{n}/loss"] for n, w in self.task.weights.items() if f"{n}/loss" in metrics)

    # ------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Per-task dev loss and masked-token accuracy; fixed masks, so numbers compare across steps."""
        if self.dev_data is None:
            return {}
        n = len(self.dev_data)
        per_rank = max(1, math.ceil(n / (self.world_size * self.cfg.train.batch_size)))
        # Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively).
        parts = np.array_split(np.arange(n), self.world_size * per_rank)
        mine = [p if len(p) else np.arange(1) for p in parts[self.rank :: self.world_size]]
        empty = [len(p) == 0 for p in parts[self.rank :: self.world_size]]
        self.engine.eval()
        sums: dict[str, float] = {}
        for rows, is_padding in zip(mine, empty):
            batch = to_device(self.collator(self.dev_data.rows(rows), EVAL_EPOCH), self.engine.device)
            local = {k: float(v) for k, v in self.task.count_targets(batch).items()}
            _, report = self.engine(batch, local)
            if not is_padding:
                _accumulate(sums, {k: float(v) for k, v in report.items()})
        self.engine.train()
        metrics = _task_metrics(dist.all_reduce_dict(sums, self.engine.device))
        metrics["loss"] = self.weighted_loss(metrics)
        return metrics

    def evaluate_and_export_best(self, monitor: Monitor) -> None:
        metrics = self.evaluate()
        if not metrics:
            return
        monitor.scalars(self.global_step, metrics, prefix="eval/")
        self.history.append({"step": self.global_step, **{f"eval/{k}": v for k, v in metrics.items()}})
        key = self.cfg.train.best_metric
        if key not in metrics:
            raise ValueError(f"`train.best_metric={key}` is not an eval metric; available: {sorted(metrics)}")
        value = metrics[key]
        higher_is_better = "acc" in key
        better = self.best_metric is None or (value > self.best_metric if higher_is_better else value < self.best_metric)
        if better:
            self.best_metric = value
            self.export(self.run_dir / "best", extra={"step": self.global_step, key: value})

    # ------------------------------------------------------------------ saving

    def save_checkpoint(self) -> None:
        state = {"global_step": self.global_step, "epoch": self.epoch, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen}
        self.engine.save(self.run_dir / "checkpoints", f"step-{self.global_step}", client_state={"trainer": state})
        self.logger.info("saved DeepSpeed checkpoint step-%d", self.global_step)

    def export(self, directory: Path, extra: dict | None = None) -> None:
        """Encoder weights as config.json + model.safetensors (collective: gathers ZeRO shards)."""
        state = self.engine.full_state_dict(self.model)
        if self.cfg.lora.enabled:
            state = merge_lora_state_dict(state, self.cfg.lora.r, self.cfg.lora.alpha)
        if dist.is_main():
            self.model.save_pretrained(directory, state_dict=state)
            info = {"global_step": self.global_step, **(extra or {})}
            (directory / "trainer_state.json").write_text(json.dumps(info, indent=1))
        dist.barrier()


def _accumulate(into: dict[str, float], values: dict[str, float]) -> None:
    for key, value in values.items():
        into[key] = into.get(key, 0.0) + value


def _task_metrics(sums: dict[str, float]) -> dict[str, float]:
    """{'gene_mask/loss_sum', '/count', '/correct'} -> {'gene_mask/loss', 'gene_mask/acc'}."""
    out = {}
    for key in sorted(sums):
        if not key.endswith("/count"):
            continue
        name = key[: -len("/count")]
        count = sums[key]
        if count > 0:
            out[f"{name}/loss"] = sums[f"{name}/loss_sum"] / count
            out[f"{name}/acc"] = sums[f"{name}/correct"] / count
    return out


def run_training(cfg: Config) -> dict:
    return Trainer(cfg).train()
