"""Sequence-level fine-tuning of a pretrained gene/protein encoder (`model.model_type=seq_finetune`).

LucaOne's downstream tasks in lucatrain: a CSV of sequences with one label each
(`seq_id,seq_type,seq,label`, LucaOne's downstream layout), an encoder from `model.model_dirpath`
(a lucatrain export such as `runs/demo/best`, or a LucaOne/LucaVirus `checkpoint-step<N>/`), and a
head on the pooled sequence vector:

    hidden = encoder(tokens)                       (B, L, H)
    pooled = [CLS] vector or mean over residues    (B, H)          finetune.pooling
    output = Linear(GELU(Linear(dropout(pooled)))) (B, K)          K = labels (multi_class) or 1

Output modes (LucaOne's names): `multi_class` (cross-entropy over the classes of the label file),
`binary_class` (one logit, BCE; a label file of two names, the second the positive class; labels 0/1
or those names), `regression`
(`finetune.loss_type` l2, l1 or smooth_l1 on a number). Labels are checked when the data is
prepared: an index outside the label file, a name not in it, or a value that is not a finite number
stops `prepare` naming the file and line.

Everything else (DeepSpeed, ZeRO, the ledger and exact resume, checkpoints, TensorBoard, `best/`
by a declared metric) is the generic trainer's. This module is the proof that a family needs no
change to the trainer.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from lucatrain import dist
from lucatrain.config import ConfigError
from lucatrain.data.collate import Collator
from lucatrain.data.schema import Column, PrepareRecipe, Schema
from lucatrain.embed import POOLINGS, pool
from lucatrain.export import HEADS_CONFIG, HEADS_WEIGHTS, split_task_state, write_export
from lucatrain.families import register_family
from lucatrain.families.base import Family
from lucatrain.families.lucaone.labels import read_label_file  # LucaOne's label-file format
from lucatrain.models.encoder import build_model_with_report, encoder_of_checkpoint, record_encoder
from lucatrain.models.heads import TaskHead
from lucatrain.models.lora import apply_lora, lora_settings
from lucatrain.models.lucagplm import CONFIG_NAME, LucaGPLM, LucaGPLMConfig
from lucatrain.task import Metric, Task, higher_is_better, lower_is_better, normalised_loss

MULTI_CLASS, BINARY_CLASS, REGRESSION = "multi_class", "binary_class", "regression"
OUTPUT_MODES = (MULTI_CLASS, BINARY_CLASS, REGRESSION)
REGRESSION_LOSSES = {"l2": F.mse_loss, "l1": F.l1_loss, "smooth_l1": F.smooth_l1_loss}
HEAD = "label"  # the head's name in the Task (heads.<HEAD>.*) and in heads.json
LABEL_FILE = "label.txt"


@dataclass
class FinetuneConfig:
    output_mode: str = MULTI_CLASS
    """'multi_class', 'binary_class' or 'regression' (LucaOne's output modes)."""
    label_file: str = ""
    """Class names, a `label` header then one name per line (a label's index is its line number).
    Empty: label.txt beside the train files or one directory up (LucaOne's downstream layout).
    Not used for regression."""
    pooling: str = "cls"
    """Sequence vector the head reads: 'cls' (the [CLS] token) or 'mean' (mean over residues)."""
    classifier_size: int = 128
    """Hidden width of the head (dropout -> Linear H->C -> GELU -> Linear C->K)."""
    dropout: float = 0.1
    """Dropout before the head."""
    loss_type: str = "l2"
    """Regression loss: 'l2', 'l1' or 'smooth_l1'."""
    freeze_encoder: bool = False
    """Train the head only (linear probing); the encoder's weights stay as loaded."""

    def validate(self) -> None:
        for key, value, choices in (("output_mode", self.output_mode, OUTPUT_MODES), ("pooling", self.pooling, POOLINGS),
                                    ("loss_type", self.loss_type, tuple(REGRESSION_LOSSES))):  # fmt: skip
            if value not in choices:
                raise ConfigError(f"`finetune.{key}` must be one of {list(choices)}, got {value!r}")
        if self.classifier_size <= 0:
            raise ConfigError(f"`finetune.classifier_size` must be > 0, got {self.classifier_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`finetune.dropout` must be in [0, 1), got {self.dropout}")


def find_label_file(cfg) -> Path:
    """`finetune.label_file`, or label.txt beside (or one directory above) the first train input."""
    if cfg.finetune.label_file:
        return Path(cfg.finetune.label_file).expanduser()
    if cfg.data.train_files:
        first = Path(cfg.data.train_files[0])
        base = first.parent if first.is_file() else first
        for directory in (base, base.parent):
            if (directory / LABEL_FILE).is_file():
                return directory / LABEL_FILE
    raise ValueError(f"a {cfg.finetune.output_mode} task needs class names: no {LABEL_FILE} beside the train files; "
                     "set `finetune.label_file`")  # fmt: skip


class SeqLabelRecipe(PrepareRecipe):
    """seq_label_csv records -> (obj_id, obj_type, seq, label), the label checked and encoded."""

    name = "seq_finetune"
    formats = ("seq_label_csv",)

    def __init__(self, output_mode: str, label_names: list[str] | None):
        self.output_mode = output_mode
        self.label_names = label_names
        kind = "float" if output_mode == REGRESSION else "int"
        self.schema = Schema((Column("obj_id", "string"), Column("obj_type", "int8"), Column("seq", "large_string"),
                              Column("label", kind)))  # fmt: skip

    def fingerprint_options(self) -> dict:
        # The stored label is an index into the label file: another file (or mode) is another dataset.
        return {"recipe": self.name, "output_mode": self.output_mode, "labels": self.label_names}

    def row(self, record) -> dict:
        return {"obj_id": record.obj_id, "obj_type": record.obj_type, "seq": record.seq, "label": self.parse(record.extra["label"])}

    def parse(self, text: str):
        text = text.strip()
        if self.output_mode == REGRESSION:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"label {text!r} is not a number (regression)") from None
            if not math.isfinite(value):
                raise ValueError(f"label {text!r} is not a finite number")
            return value
        names = self.label_names
        if text.lstrip("-").isdigit():
            index = int(text)
            if not 0 <= index < len(names):
                raise ValueError(f"label index {index} is outside the label file's {len(names)} classes (0..{len(names) - 1})")
            return index
        if text in names:
            return names.index(text)
        raise ValueError(f"label {text!r} is neither a class index nor a name of the label file ({names[:5]}...)")

    def meta(self) -> dict:
        return {"output_mode": self.output_mode, "label_names": self.label_names}


@dataclass(frozen=True)
class TargetColumn:
    """The Collator's label hook: the `label` column as the `target` tensor (picklable for DataLoader workers)."""

    dtype: str

    def __call__(self, rows: dict, n_residues, cuts, width: int) -> dict:
        return {"target": np.asarray(rows["label"], dtype=self.dtype)}


class SeqFinetuneTask(Task):
    """Encoder + pooling + one head; `loss = sum of per-sample losses / samples in the step`."""

    def __init__(self, model, output_mode: str, num_outputs: int, pooling: str, classifier_size: int, dropout: float,
                 loss_type: str):  # fmt: skip
        super().__init__()
        self.model = model
        self.output_mode, self.pooling, self.loss_type = output_mode, pooling, loss_type
        self.num_outputs = num_outputs
        self.heads = torch.nn.ModuleDict({HEAD: TaskHead(model.config.hidden_size, classifier_size, num_outputs, dropout)})

    def forward(self, batch: dict, totals: dict[str, float]):
        hidden = self.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, L, H)
        pooled = pool(hidden, batch["attention_mask"], self.pooling)  # (B, H)
        outputs = self.heads[HEAD](pooled).float()  # (B, K)
        target = batch["target"]
        report = {"samples_count": torch.tensor(float(len(target)), device=outputs.device)}
        if self.output_mode == MULTI_CLASS:
            loss_sum = F.cross_entropy(outputs, target, reduction="sum")
            predicted = outputs.argmax(dim=-1)
            classes = torch.arange(self.num_outputs, device=outputs.device)[:, None]  # (K, 1)
            hit, said, truth = (predicted == target), (predicted == classes), (target == classes)  # (B,), (K, B), (K, B)
            report["correct"] = hit.sum().float()
            report["tp"] = (said & truth).sum(dim=1).float()
            report["fp"] = (said & ~truth).sum(dim=1).float()
            report["fn"] = (~said & truth).sum(dim=1).float()
        elif self.output_mode == BINARY_CLASS:
            logits, actual = outputs[:, 0], target > 0
            loss_sum = F.binary_cross_entropy_with_logits(logits, actual.float(), reduction="sum")
            predicted = logits > 0
            report["correct"] = (predicted == actual).sum().float()
            report["tp"] = (predicted & actual).sum().float()
            report["fp"] = (predicted & ~actual).sum().float()
            report["fn"] = (~predicted & actual).sum().float()
        else:
            values = outputs[:, 0]
            loss_sum = REGRESSION_LOSSES[self.loss_type](values, target.float(), reduction="sum")
            error = values - target.float()
            report["abs_err_sum"] = error.abs().sum().detach()
            report["sq_err_sum"] = (error**2).sum().detach()
            report["target_sum"] = target.float().sum()
            report["target_sq_sum"] = (target.float() ** 2).sum()
        report["loss_sum"] = loss_sum.detach()
        return normalised_loss(None, {"samples": loss_sum}, {}, totals), report

    def metrics(self) -> dict[str, Metric]:
        if self.output_mode == REGRESSION:
            return {"loss": lower_is_better("loss"), "mae": lower_is_better("mae"), "r2": higher_is_better("r2")}
        f1 = "macro_f1" if self.output_mode == MULTI_CLASS else "f1"
        return {"loss": lower_is_better("loss"), "acc": higher_is_better("acc"), f1: higher_is_better(f1)}

    def summarize(self, sums: dict) -> dict[str, float]:
        n = float(sums.get("samples_count", 0.0))
        if n <= 0:
            return {}
        out = {"loss": float(sums["loss_sum"]) / n}
        if self.output_mode == REGRESSION:
            out["mae"] = float(sums["abs_err_sum"]) / n
            spread = float(sums["target_sq_sum"]) - float(sums["target_sum"]) ** 2 / n  # total sum of squares
            out["r2"] = 1.0 - float(sums["sq_err_sum"]) / spread if spread > 0 else 0.0
            return out
        out["acc"] = float(sums["correct"]) / n
        tp, fp, fn = (np.atleast_1d(np.asarray(sums[k], dtype=np.float64)) for k in ("tp", "fp", "fn"))
        if self.output_mode == BINARY_CLASS:
            denominator = float(2 * tp.sum() + fp.sum() + fn.sum())
            out["f1"] = float(2 * tp.sum()) / denominator if denominator else 0.0
        else:
            occurring = (tp + fp + fn) > 0  # classes seen as a target or a prediction
            per_class = 2 * tp[occurring] / (2 * tp[occurring] + fp[occurring] + fn[occurring])
            out["macro_f1"] = float(per_class.mean()) if occurring.any() else 0.0
        return out


@register_family
class SeqFinetuneFamily(Family):
    name = "seq_finetune"
    config_sections = {"finetune": FinetuneConfig}

    def prepare_recipe(self, split: str | None = None) -> SeqLabelRecipe:
        mode = self.cfg.finetune.output_mode
        names = None if mode == REGRESSION else read_label_file(find_label_file(self.cfg))
        if mode == BINARY_CLASS and len(names) != 2:
            raise ValueError(f"binary_class needs a label file with 2 names, {find_label_file(self.cfg)} has {len(names)}")
        self.recipe = SeqLabelRecipe(mode, names)
        return self.recipe

    def columns(self) -> tuple[str, ...]:
        return ("sample_id", "obj_type", "seq", "label")

    def collator(self) -> Collator:
        cfg = self.cfg
        target = TargetColumn("float32" if cfg.finetune.output_mode == REGRESSION else "int64")
        return Collator(cfg.data.max_length, cfg.data.truncation, masking=None, seed=cfg.train.seed, labels=target)

    def build_task(self, resume_from: Path | None = None) -> SeqFinetuneTask:
        cfg, ft = self.cfg, self.cfg.finetune
        if resume_from is not None:
            model = encoder_of_checkpoint(resume_from, cfg)  # its weights come with the resume
            record_encoder(cfg, model.config, self.logger, f"the checkpoint {resume_from}")
        else:
            model, report = build_model_with_report(cfg)
            if report is not None:
                self.logger.info("encoder from LucaOne checkpoint: %s", report.summary())
            if cfg.model.model_dirpath:
                record_encoder(cfg, model.config, self.logger, cfg.model.model_dirpath)
            elif dist.is_main():
                self.logger.warning("model.model_dirpath is empty: fine-tuning an encoder initialised at random")
        self.encoder_config = model.config
        self.num_params = model.num_parameters()
        if ft.freeze_encoder:
            model.requires_grad_(False)
        if cfg.lora.enabled:
            lora = cfg.lora
            model = apply_lora(model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        names = self.recipe.label_names
        outputs = len(names) if ft.output_mode == MULTI_CLASS else 1
        return SeqFinetuneTask(model, ft.output_mode, outputs, ft.pooling, ft.classifier_size, ft.dropout, ft.loss_type)

    def describe(self) -> str:
        frozen = " (frozen)" if self.cfg.finetune.freeze_encoder else ""
        return f"encoder params={self.num_params / 1e6:.2f}M{frozen} output_mode={self.cfg.finetune.output_mode}"

    def resume_state(self) -> dict:
        ft = self.cfg.finetune
        return {"output_mode": ft.output_mode, "labels": self.recipe.label_names, "pooling": ft.pooling}

    def export_info(self, task: SeqFinetuneTask) -> dict:
        ft = self.cfg.finetune
        head = {"output_mode": ft.output_mode, "pooling": ft.pooling, "labels": self.recipe.label_names,
                "classifier_size": ft.classifier_size, "num_outputs": task.num_outputs, "loss_type": ft.loss_type}  # fmt: skip
        return {"encoder_config": self.encoder_config.to_dict(), "heads": {HEAD: head}, "lora": lora_settings(self.cfg)}

    @classmethod
    def export(cls, directory: Path, state: dict, info: dict, with_heads: bool = True) -> None:
        """The encoder (transformers-loadable, as every lucatrain export) + heads.safetensors/heads.json."""
        encoder, head = split_task_state(state, info.get("lora"))
        config = LucaGPLMConfig(**info["encoder_config"])
        if with_heads:
            write_export(directory, config, encoder, head, info["heads"])
        else:
            write_export(directory, config, encoder)


def load_finetuned(directory) -> SeqFinetuneTask:
    """A fine-tuned export (best/, last/ or `lucatrain export --heads`) as a ready Task module (eval mode)."""
    directory = Path(directory)
    for name in (CONFIG_NAME, HEADS_WEIGHTS, HEADS_CONFIG):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found: not a seq_finetune export")
    head = json.loads((directory / HEADS_CONFIG).read_text())[HEAD]
    encoder = LucaGPLM.from_pretrained(directory)
    task = SeqFinetuneTask(encoder, head["output_mode"], head["num_outputs"], head["pooling"], head["classifier_size"], 0.0,
                           head["loss_type"])  # fmt: skip
    weights = {k.removeprefix(f"{HEAD}."): v for k, v in load_file(directory / HEADS_WEIGHTS).items()}
    task.heads[HEAD].load_state_dict(weights)
    return task.eval()
