"""Task heads on encoder vectors."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class TaskHead(nn.Module):
    """LucaOne's task head: dropout -> hidden_layer (H -> C) -> GELU -> classifier (C -> K)."""

    def __init__(self, hidden_size: int, classifier_size: int, num_outputs: int, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.hidden_layer = nn.Linear(hidden_size, classifier_size)
        self.classifier = nn.Linear(classifier_size, num_outputs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.gelu(self.hidden_layer(self.dropout(x))))
