"""The LucaOne/LucaVirus family: masked-LM pretraining of `LucaGPLM` plus LucaOne's label tasks.

What it adds to the generic trainer:
- a prepare recipe that checks every record's labels against the task table (file:line on error)
  and stores per-task label statistics in meta.json;
- `setup`: the task plan (selected tasks minus those without training labels, label counts from the
  label files, label indices checked against them), logged at start-up;
- the encoder (fresh, a lucatrain export, or a LucaOne/LucaVirus checkpoint with its task heads),
  LoRA, and the PretrainTask with one head per label task;
- the collator (masking + label tensors), the rows of the molecules the trained tasks score;
- resume compatibility (same tasks, label counts and output modes) and the export (encoder in
  LucaOne's state-dict names, transformers-loadable, plus heads.safetensors / heads.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from lucatrain import dist
from lucatrain.config import ConfigError
from lucatrain.data import alphabet
from lucatrain.data.collate import Collator, MaskingConfig
from lucatrain.data.schema import PrepareRecipe
from lucatrain.export import split_task_state, write_export
from lucatrain.families import register_family
from lucatrain.families.base import Family
from lucatrain.families.lucaone.config import TasksConfig
from lucatrain.families.lucaone.labels import LabelStats, TaskLabelEncoder, check_labels, spans_cut
from lucatrain.families.lucaone.plan import TaskPlan, plan_tasks
from lucatrain.families.lucaone.specs import TASK_NAMES, TASKS
from lucatrain.families.lucaone.task import PretrainTask
from lucatrain.models.encoder import build_model_with_report, encoder_of_checkpoint, record_encoder
from lucatrain.models.lora import apply_lora, lora_settings
from lucatrain.models.lucagplm import LucaGPLMConfig
from lucatrain.models.lucaone_checkpoint import load_lucaone_heads


SPANS_CUT_SAMPLE = 100_000  # records whose labels start-up reads to count the spans truncation cuts


class LucaOneRecipe(PrepareRecipe):
    """Gene/protein records whose labels are checked against LucaOne's task table at prepare time."""

    name = "lucaone"
    formats = ("lucaone_csv", "fasta", "fastq", "swissprot", "parquet", "jsonl")

    def fingerprint_options(self) -> dict:
        return {}  # the fingerprint of datasets prepared before recipes existed, so their order is kept

    def start(self) -> None:
        self.stats = {alphabet.GENE: LabelStats(), alphabet.PROT: LabelStats()}

    def row(self, record) -> dict:
        found = check_labels(json.loads(record.labels), record.obj_type, len(record.seq))
        self.stats[record.obj_type].add(found)
        return super().row(record)

    def meta(self) -> dict:
        # Per task: records carrying it and the largest label index (checked against label files at start).
        gene, prot = self.stats[alphabet.GENE].to_json(), self.stats[alphabet.PROT].to_json()
        return {"labels": {**gene, **prot}}

    def merge_meta(self, parts: list[dict]) -> dict:
        merged = LabelStats()
        for part in parts:
            merged.merge(LabelStats(part["labels"]))
        return {"labels": merged.to_json()}


LUCAONE_RECIPE = LucaOneRecipe()


def build_task(model, task_names, weights=None, num_labels=None, classifier_sizes=None, classifier_dropout=0.0,
               output_modes=None, loss_types=None) -> PretrainTask:  # fmt: skip
    """The Task module training `task_names` on `model` (heads sized by `num_labels`)."""
    unknown = [n for n in task_names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks are {list(TASK_NAMES)}")
    return PretrainTask(model, task_names, weights, num_labels, classifier_sizes, classifier_dropout, output_modes, loss_types)


@register_family
class LucaOneFamily(Family):
    name = "lucaone_gplm"
    config_sections = {"tasks": TasksConfig}

    @classmethod
    def check_config(cls, cfg) -> None:
        for name in cfg.model.lucaone_head_tasks:
            if name not in TASK_NAMES:
                raise ConfigError(f"`model.lucaone_head_tasks`: unknown task {name!r}; valid tasks are {list(TASK_NAMES)}")

    def prepare_recipe(self, split: str | None = None) -> PrepareRecipe:
        return LUCAONE_RECIPE

    def setup(self, train_data, dev_data: dict) -> None:
        """The tasks this run trains (`tasks.plan`), checked against the label files and the data."""
        cfg, logger = self.cfg, self.logger
        stats = LabelStats(train_data.meta.get("labels"))
        dev_stats = None
        if dev_data:
            dev_stats = LabelStats()
            for data in dev_data.values():
                dev_stats.merge(LabelStats(data.meta.get("labels")))
        self.plan: TaskPlan = plan_tasks(cfg.tasks.selected(), cfg.tasks.label_dir, cfg.data.train_files, stats, dev_stats,
                                         cfg.tasks.output_modes)  # fmt: skip
        plan = self.plan
        if not self._trained_type(train_data).any():
            kinds = {alphabet.GENE: "gene", alphabet.PROT: "prot"}
            trained = sorted(kinds[t] for t in plan.obj_types)
            raise ValueError(f"the selected tasks {plan.names} train on {' and '.join(trained)} records, but the training data "
                             f"({len(train_data)} records) holds none; select tasks of its molecule or add such records")  # fmt: skip
        if not dist.is_main():
            return
        logger.info("tasks: %s", ", ".join(f"{n} ({plan.num_labels[n]} labels)" if n in plan.num_labels else n
                                           for n in plan.names))  # fmt: skip
        for name, why in plan.dropped.items():
            logger.warning("task %s is not trained: %s", name, why)
        if plan.unknown_label_keys:
            logger.warning("label entries that name no task are ignored: %s (tasks: %s)", plan.unknown_label_keys, list(TASKS))
        self.log_spans_cut(train_data)

    def log_spans_cut(self, data) -> None:
        """Say how many spans of span tasks truncation drops or clips (only cut records are read; of a
        corpus with more than SPANS_CUT_SAMPLE of them, an evenly spaced sample, so start-up stays short)."""
        cfg = self.cfg
        cut_rows = np.flatnonzero(data.lengths > cfg.data.max_length - 2)
        if not cut_rows.size or not any(TASKS[n].level == "span_level" for n in self.plan.names):
            return
        where = "the training data"
        if cut_rows.size > SPANS_CUT_SAMPLE:
            where = f"{SPANS_CUT_SAMPLE:,} of the {cut_rows.size:,} cut training records"
            cut_rows = cut_rows[np.linspace(0, cut_rows.size - 1, SPANS_CUT_SAMPLE).astype(np.int64)]
        labels = data.rows(cut_rows, ["labels"])["labels"]
        for name, (dropped, clipped) in spans_cut(labels, data.lengths[cut_rows], cfg.data.max_length, cfg.data.truncation,
                                                  self.plan.names).items():  # fmt: skip
            self.logger.info("task %s: truncation to data.max_length=%d drops %d span(s) and clips %d in %s",
                             name, cfg.data.max_length, dropped, clipped, where)  # fmt: skip

    def trainable_rows(self, data) -> np.ndarray:
        """Records of a molecule no trained task scores are left out (a protein-only run on mixed data)."""
        return np.flatnonzero(self._trained_type(data))

    def _trained_type(self, data) -> np.ndarray:
        """(N,) bool: the record's molecule is one a trained task scores. Comparisons, not np.isin,
        which builds an 8-byte copy of the column (most of a second at 10 M records)."""
        trained = np.zeros(len(data), dtype=bool)
        for obj_type in self.plan.obj_types:
            trained |= data.obj_types == obj_type
        return trained

    def order_key(self) -> dict:
        return {"obj_types": self.plan.obj_types}

    def columns(self) -> tuple[str, ...]:
        return ("sample_id", "obj_type", "seq", "labels")

    def collator(self) -> Collator:
        cfg, plan = self.cfg, self.plan
        masking = MaskingConfig(cfg.tasks.mask_prob, cfg.tasks.mask_token_prob, cfg.tasks.random_token_prob)
        label_tasks = tuple(plan.label_tasks)
        labels = TaskLabelEncoder(label_tasks, dict(plan.num_labels), dict(plan.output_modes)) if label_tasks else None
        return Collator(cfg.data.max_length, cfg.data.truncation, masking, cfg.train.seed, labels)

    def build_task(self, resume_from: Path | None = None) -> PretrainTask:
        cfg, plan = self.cfg, self.plan
        if resume_from is not None:
            self.model, lucaone_report = encoder_of_checkpoint(resume_from, cfg), None
            record_encoder(cfg, self.model.config, self.logger, f"the checkpoint {resume_from}")
        else:
            self.model, lucaone_report = build_model_with_report(cfg)
            if cfg.model.model_dirpath:
                record_encoder(cfg, self.model.config, self.logger, cfg.model.model_dirpath)
        self.num_params = self.model.num_parameters()  # before ZeRO-3 partitions the parameters away
        if cfg.lora.enabled:
            lora = cfg.lora
            self.model = apply_lora(self.model, lora.r, lora.alpha, lora.dropout, lora.target_modules)
        t = cfg.tasks
        task = build_task(self.model, plan.names, t.weights, plan.num_labels, t.classifier_sizes, t.classifier_dropout,
                          plan.output_modes, t.loss_types)  # fmt: skip
        if lucaone_report is not None:
            load_lucaone_heads(lucaone_report, task.heads, cfg.model.lucaone_head_tasks or None)
            self.logger.info("initialised from LucaOne checkpoint: %s", lucaone_report.summary())
        self.num_head_params = sum(p.numel() for p in task.heads.parameters())
        return task

    def describe(self) -> str:
        return f"params={self.num_params / 1e6:.2f}M (+{self.num_head_params / 1e6:.2f}M in task heads)"

    def resume_state(self) -> dict:
        plan = self.plan
        return {"tasks": plan.names, "num_labels": plan.num_labels, "output_modes": plan.output_modes}

    def check_resume(self, saved: dict, path: Path) -> None:
        ours = json.loads(json.dumps(self.resume_state()))  # as the checkpoint stores it, so the two compare
        trained = {k: saved.get(k, v) for k, v in ours.items()}
        if trained != ours:
            raise ValueError(
                f"{path} was trained with tasks {trained['tasks']} (label counts {trained['num_labels']}, modes "
                f"{trained['output_modes']}); this run has {ours['tasks']} ({ours['num_labels']}, {ours['output_modes']}). "
                "Resume with the same tasks and label files, or start a new run from its export with `model.model_dirpath`."
            )

    def export_info(self, task: PretrainTask) -> dict:
        """What an export needs besides the weights: encoder config, heads and their labels, LoRA."""
        heads = {
            name: {
                "level": TASKS[name].level,
                "output_mode": task.modes[name],
                "loss_type": task.loss_types[name],
                "molecule": "gene" if TASKS[name].obj_type == 0 else "prot",
                "classifier_size": head.hidden_layer.out_features,
                "num_outputs": head.classifier.out_features,
                "weight": task.weights[name],
                "labels": self.plan.label_names.get(name),
            }
            for name, head in task.heads.items()
        }
        return {"encoder_config": self.model.config.to_dict(), "heads": heads, "lora": lora_settings(self.cfg)}

    @classmethod
    def export(cls, directory: Path, state: dict, info: dict, with_heads: bool = True) -> None:
        """Encoder (transformers-loadable) and task heads, see `lucatrain.export`."""
        encoder, heads = split_task_state(state, info.get("lora"))
        config = LucaGPLMConfig(**info["encoder_config"])
        if with_heads:
            write_export(directory, config, encoder, heads, info.get("heads"))
        else:
            write_export(directory, config, encoder)

