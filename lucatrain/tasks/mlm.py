"""Masked-LM for genes (`gene_mask`) and proteins (`prot_mask`) with one shared, tied LM head.

Loss normalisation: each task's loss is the sum of token cross-entropies divided by the number of
masked tokens of that task in the *whole optimizer step* (all micro-batches, all ranks), given in
`totals`. Summed over micro-batches and ranks this is exactly the per-token mean a single big batch
would give, so gradient accumulation and data parallelism change nothing numerically.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lucatrain.data import alphabet

# Task name -> token type it is scored on.
MLM_TASKS = {"gene_mask": alphabet.GENE, "prot_mask": alphabet.PROT}


class MaskedLMTask(nn.Module):
    def __init__(self, model: nn.Module, task_names: list[str], weights: dict[str, float]):
        super().__init__()
        self.model = model
        self.task_names = list(task_names)
        self.weights = {name: float(weights.get(name, 1.0)) for name in self.task_names}

    def count_targets(self, batch: dict) -> dict[str, int]:
        """Masked positions per task in one micro-batch (the normaliser's building block)."""
        selected = batch["labels"] != alphabet.IGNORE_INDEX
        types = batch["token_type_ids"][selected]
        return {name: int((types == MLM_TASKS[name]).sum()) for name in self.task_names}

    def forward(self, batch: dict, totals: dict[str, float]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        hidden = self.model(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])  # (B, L, H)
        selected = batch["labels"] != alphabet.IGNORE_INDEX  # (B, L)
        # The LM head runs on masked positions only: (N, H) -> (N, V), not (B, L, V).
        logits = self.model.mlm_logits(hidden[selected]).float()
        targets = batch["labels"][selected]
        token_loss = F.cross_entropy(logits, targets, reduction="none")  # (N,)
        correct = logits.argmax(dim=-1) == targets
        types = batch["token_type_ids"][selected]

        # Start from a graph-connected zero so a micro-batch without any target still backprops.
        loss = hidden.sum() * 0.0
        report = {}
        for name in self.task_names:
            of_task = types == MLM_TASKS[name]
            task_loss_sum = token_loss[of_task].sum()
            if totals.get(name, 0) > 0:
                loss = loss + self.weights[name] * task_loss_sum / totals[name]
            report[f"{name}/loss_sum"] = task_loss_sum.detach().float()
            report[f"{name}/count"] = of_task.sum().float()
            report[f"{name}/correct"] = correct[of_task].sum().float()
        return loss, report
