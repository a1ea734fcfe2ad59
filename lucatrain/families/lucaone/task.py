"""The pretraining objective: the encoder, the shared masked-LM head, and one head per label task.

Loss normalisation: each task's loss is the sum of its per-target losses divided by the number of
that task's targets in the *whole optimizer step* (all micro-batches, all ranks), given in `totals`
(from `count_targets`, summed by the trainer). Summed over micro-batches and ranks this is exactly
the per-target mean one big batch would give, so gradient accumulation and data parallelism change
nothing numerically. A target is a masked token (masked-LM), a token inside a span (span tasks), a
labelled record (taxonomy), one (record, label) pair (keywords) or one coordinate (structure).

Multi-process safety: every head runs exactly once in every forward, on whatever rows of the
micro-batch carry its labels, possibly none. Every parameter therefore gets a gradient on every rank
at every step, and under ZeRO-3 every rank gathers the same modules in the same order. A rank whose
micro-batch holds only genes, or no keyword labels, neither crashes nor hangs (LucaOne's DDP run
died on its second step for this reason).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lucatrain.data.alphabet import IGNORE_INDEX
from lucatrain.models.heads import TaskHead
from lucatrain.families.lucaone.specs import METRICS, MLM, MULTI_CLASS, MULTI_LABEL, REGRESSION, TASKS, resolve_modes
from lucatrain.task import Metric, Task, higher_is_better, lower_is_better, normalised_loss

# Metrics where a larger value is better; every other metric (losses, MAE) is better lower.
HIGHER_IS_BETTER = ("acc", "micro_f1", "macro_f1")

# Regression losses by `tasks.loss_types` name, all summed over coordinates.
REGRESSION_LOSSES = {"l1": F.l1_loss, "l2": F.mse_loss, "smooth_l1": F.smooth_l1_loss}


def num_outputs(name: str, num_labels: dict[str, int]) -> int:
    return 3 if TASKS[name].output_mode == REGRESSION else num_labels[name]


class PretrainTask(Task):
    """`loss, report = task(batch, totals)` for any selection of the tasks in `specs.TASKS`.

    report holds, per task, `<task>/loss_sum` and `<task>/count` (targets), plus `<task>/correct`
    (multi-class), `<task>/tp|fp|fn` vectors over labels (multi-label), `<task>/abs_err_sum`
    (regression); `train_step` and `evaluate` sum them over micro-batches and ranks and `summarize`
    turns them into metrics (`metrics_from_sums`). `output_modes` and `loss_types` override the task
    table per task.
    """

    def __init__(self, model: nn.Module, task_names, weights: dict[str, float] | None = None,
                 num_labels: dict[str, int] | None = None, classifier_sizes: dict[str, int] | None = None,
                 classifier_dropout: float = 0.0, output_modes: dict[str, str] | None = None,
                 loss_types: dict[str, str] | None = None):  # fmt: skip
        super().__init__()
        weights, num_labels, classifier_sizes = weights or {}, num_labels or {}, classifier_sizes or {}
        self.model = model
        self.task_names = [n for n in TASKS if n in set(task_names)]  # table order, the same on every rank
        self.weights = {n: float(weights.get(n, TASKS[n].default_weight)) for n in self.task_names}
        self.modes, self.loss_types = resolve_modes(self.task_names, output_modes, loss_types)
        self.mlm_tasks = [n for n in self.task_names if self.modes[n] == MLM]
        self.label_tasks = [n for n in self.task_names if TASKS[n].has_head]
        hidden = model.config.hidden_size
        self.heads = nn.ModuleDict({
            name: TaskHead(hidden, classifier_sizes.get(name, TASKS[name].default_classifier_size),
                           num_outputs(name, num_labels), classifier_dropout)
            for name in self.label_tasks
        })  # fmt: skip

    # ------------------------------------------------------------------ metrics

    def metrics(self) -> dict[str, Metric]:
        """`loss` (the weighted total) and per task its loss and the metrics of its output mode."""
        declared = {"loss": lower_is_better("loss")}
        for name in self.task_names:
            for metric in METRICS[self.modes[name]]:
                key = f"{name}/{metric}"
                declared[key] = higher_is_better(key) if metric in HIGHER_IS_BETTER else lower_is_better(key)
        return declared

    def summarize(self, sums: dict) -> dict[str, float]:
        """Per-task metrics from summed reports, then `loss`: the objective as the optimizer sees it,
        the sum over tasks of weight x per-target mean loss."""
        metrics = metrics_from_sums(sums)
        metrics["loss"] = sum(w * metrics[f"{n}/loss"] for n, w in self.weights.items() if f"{n}/loss" in metrics)
        return metrics

    # ------------------------------------------------------------------ targets

    def target_mask(self, name: str, labels: torch.Tensor) -> torch.Tensor:
        """Which positions (per-token tasks) or rows (sequence tasks) of `labels` carry a target."""
        mode = self.modes[name]
        if mode == REGRESSION:
            return ~torch.isnan(labels[..., 0])
        if mode == MULTI_LABEL:
            return labels[:, 0] != IGNORE_INDEX
        return labels != IGNORE_INDEX

    def count_targets(self, batch: dict) -> dict[str, int]:
        """Targets per task in one micro-batch (the normaliser's building block)."""
        counts = {}
        if self.mlm_tasks:
            types = batch["token_type_ids"][batch["labels"] != IGNORE_INDEX]
            for name in self.mlm_tasks:
                counts[name] = int((types == TASKS[name].obj_type).sum())
        for name in self.label_tasks:
            labels = batch[f"{name}_labels"]
            present = int(self.target_mask(name, labels).sum())
            counts[name] = present * (labels.shape[-1] if self.modes[name] in (MULTI_LABEL, REGRESSION) else 1)
        return counts

    # ------------------------------------------------------------------ forward

    def forward(self, batch: dict, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, L, H)
        # Start from a graph-connected zero so a micro-batch without any target still backprops.
        loss = hidden.sum() * 0.0
        report: dict[str, torch.Tensor] = {}
        sums: dict[str, torch.Tensor] = {}
        if self.mlm_tasks:
            sums.update(self._masked_lm(hidden, batch, report))
        for name, head in self.heads.items():
            sums[name] = self._label_task(name, head, hidden, batch[f"{name}_labels"], report)
        # With no target anywhere in the step, a term is an empty sum (0): adding it anyway keeps every
        # head in the graph, so every parameter gets a gradient on every rank.
        return normalised_loss(loss, sums, self.weights, totals), report

    def _masked_lm(self, hidden, batch, report) -> dict[str, torch.Tensor]:
        selected = batch["labels"] != IGNORE_INDEX  # (B, L)
        # The LM head runs on masked positions only: (N, H) -> (N, V), not (B, L, V).
        logits = self.model.mlm_logits(hidden[selected]).float()
        targets = batch["labels"][selected]
        token_loss = F.cross_entropy(logits, targets, reduction="none")  # (N,)
        correct = logits.argmax(dim=-1) == targets
        types = batch["token_type_ids"][selected]
        sums = {}
        for name in self.mlm_tasks:
            of_task = types == TASKS[name].obj_type
            sums[name] = token_loss[of_task].sum()
            report[f"{name}/loss_sum"] = sums[name].detach()
            report[f"{name}/count"] = of_task.sum().float()
            report[f"{name}/correct"] = correct[of_task].sum().float()
        return sums

    def _label_task(self, name, head, hidden, labels, report) -> torch.Tensor:
        mode = self.modes[name]
        present = self.target_mask(name, labels)
        # Per-token tasks read every residue token; sequence tasks read the [CLS] vector (token 0).
        inputs = hidden[present] if TASKS[name].per_token else hidden[:, 0][present]
        outputs = head(inputs).float()  # may have 0 rows: the head still joins the graph
        targets = labels[present]
        if mode == MULTI_CLASS:
            loss_sum = F.cross_entropy(outputs, targets, reduction="sum")
            report[f"{name}/correct"] = (outputs.argmax(dim=-1) == targets).sum().float()
        elif mode == MULTI_LABEL:
            # Every label of a record that has the task is a target: unlisted labels are negatives.
            loss_sum = F.binary_cross_entropy_with_logits(outputs, targets, reduction="sum")
            predicted, actual = outputs > 0, targets > 0.5
            report[f"{name}/tp"] = (predicted & actual).sum(dim=0).float().detach()
            report[f"{name}/fp"] = (predicted & ~actual).sum(dim=0).float().detach()
            report[f"{name}/fn"] = (~predicted & actual).sum(dim=0).float().detach()
        else:  # REGRESSION on the scaled coordinates: L1 (LucaOne), L2 or smooth L1; MAE reported either way
            loss_sum = REGRESSION_LOSSES[self.loss_types[name]](outputs, targets, reduction="sum")
            report[f"{name}/abs_err_sum"] = (outputs - targets).abs().sum().detach()
        report[f"{name}/loss_sum"] = loss_sum.detach()
        report[f"{name}/count"] = torch.tensor(float(targets.numel()), device=outputs.device)
        return loss_sum


def metrics_from_sums(sums: dict) -> dict[str, float]:
    """Summed reports -> per-task metrics: `<task>/loss` always; `/acc` (multi-class and masked-LM),
    `/micro_f1` and `/macro_f1` (multi-label), `/mae` (structure). Tasks without targets are left out.

    Macro F1 averages over the labels that occur (as a target or a prediction) in the evaluated set.
    """
    out: dict[str, float] = {}
    for key in sorted(sums):
        if not key.endswith("/count"):
            continue
        name = key[: -len("/count")]
        count = float(sums[key])
        if count <= 0:
            continue
        out[f"{name}/loss"] = float(sums[f"{name}/loss_sum"]) / count
        if f"{name}/correct" in sums:
            out[f"{name}/acc"] = float(sums[f"{name}/correct"]) / count
        if f"{name}/tp" in sums:
            tp, fp, fn = (torch.as_tensor(sums[f"{name}/{k}"], dtype=torch.float64) for k in ("tp", "fp", "fn"))
            micro_denominator = float(2 * tp.sum() + fp.sum() + fn.sum())
            out[f"{name}/micro_f1"] = float(2 * tp.sum()) / micro_denominator if micro_denominator else 0.0
            occurring = (tp + fp + fn) > 0
            per_label = 2 * tp[occurring] / (2 * tp[occurring] + fp[occurring] + fn[occurring])
            out[f"{name}/macro_f1"] = float(per_label.mean()) if occurring.any() else 0.0
        if f"{name}/abs_err_sum" in sums:
            out[f"{name}/mae"] = float(sums[f"{name}/abs_err_sum"]) / count
    return out
