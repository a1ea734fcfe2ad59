"""The SimCLR Task: backbone + projection head + NT-Xent over the global batch; val loss and kNN as evaluation.

Training. Each micro-batch's loss is NT-Xent over every rank's rows of that micro-batch
(`lucatrain.contrastive.nt_xent`: 2N - 2 negatives per view for N samples), divided by the
micro-batches per step. The report's values are already shares of the step, so `summarize` gives
per-step means at any world size.

Evaluation, per dev split: `loss` (NT-Xent of the split's evaluation views, drawn from the seed alone,
so the same at every evaluation), and, with `simclr.knn_bank`, `knn_top1` of every labelled split
other than the bank: weighted kNN on L2-normalised backbone features of the plain (resized, centre
cropped) images, the bank's images as memory (each of the k nearest votes exp(cosine / T) for its label).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from lucatrain import dist
from lucatrain.contrastive import nt_xent
from lucatrain.families.clibd.task import gather_split
from lucatrain.task import Metric, Task, higher_is_better, lower_is_better


class SimclrTask(Task):
    def __init__(self, backbone, head, temperature: float, knn_bank: str = "", knn_k: int = 20, knn_temperature: float = 0.1,
                 linear_probe: bool = False):  # fmt: skip
        super().__init__()
        self.backbone, self.head = backbone, head
        self.temperature = temperature
        self.knn_bank, self.knn_k, self.knn_temperature = knn_bank, knn_k, knn_temperature
        self.linear_probe = linear_probe

    def count_targets(self, batch: dict) -> dict[str, float]:
        return {"micro_batches": 1.0}

    def project(self, views: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(views))

    def forward(self, batch: dict, totals: dict[str, float] | None):
        """(loss, report) for training; with `totals` None (evaluation), (None, outputs)."""
        a = self.project(batch["view_a"])
        b = self.project(batch["view_b"])
        # Evaluation: each batch's own loss (padding batches that keep ranks in step must not become negatives).
        share, value = nt_xent(a, b, self.temperature, gather=totals is not None)
        if totals is None:
            out = {"loss": torch.full((len(a),), value)}
            if "plain" in batch:
                out["features"] = F.normalize(self.backbone(batch["plain"]).float(), dim=-1)
            return None, out
        per_rank = totals["micro_batches"] / dist.world_size()
        share_of_step = 1.0 / (per_rank * dist.world_size())
        return share / per_rank, {"loss_total": torch.tensor(value * share_of_step), "steps": torch.tensor(share_of_step)}

    def metrics(self) -> dict[str, Metric]:
        return {"loss": lower_is_better("loss"), "knn_top1": higher_is_better("knn_top1"), "probe_top1": higher_is_better("probe_top1")}

    def summarize(self, sums: dict) -> dict[str, float]:
        steps = float(sums.get("steps", 0.0))
        return {"loss": float(sums["loss_total"]) / steps} if steps > 0 else {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, splits: dict, engine) -> dict[str, dict[str, float]]:
        engine.eval()
        try:
            gathered = {}
            for name, split in splits.items():

                def outputs(batch):
                    _, out = engine(batch, None)
                    # One loss value per batch (repeated per row): the split's loss is the row-weighted mean.
                    return {"loss": out["loss"], "features": out["features"], "label_ids": batch["label_ids"]}

                gathered[name] = gather_split(split, engine.device, outputs)
        finally:
            engine.train()
        results = {name: {"loss": float(out["loss"].mean())} for name, out in gathered.items()}
        bank = gathered.get(self.knn_bank)
        if bank is not None and (bank["label_ids"] >= 0).any():
            probe = fit_probe(bank["features"], bank["label_ids"]) if self.linear_probe else None
            for name, out in gathered.items():
                if name != self.knn_bank and (out["label_ids"] >= 0).any():
                    results[name]["knn_top1"] = knn_accuracy(out["features"], out["label_ids"], bank["features"], bank["label_ids"],
                                                             self.knn_k, self.knn_temperature)  # fmt: skip
                    if probe is not None:
                        labelled = out["label_ids"] >= 0
                        predicted = probe(out["features"][labelled])
                        results[name]["probe_top1"] = float((predicted == out["label_ids"][labelled]).mean())
        return results


def fit_probe(features: np.ndarray, labels: np.ndarray, weight_decay: float = 1e-4, iterations: int = 100):
    """A softmax regression fitted with L-BFGS from zeros on the labelled rows (deterministic: the same
    features give the same probe on every rank); returns features -> predicted label ids."""
    rows = labels >= 0
    x = torch.from_numpy(features[rows]).double()
    y = torch.from_numpy(labels[rows]).long()
    classes = int(labels.max()) + 1
    weight = torch.zeros(x.shape[1], classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=iterations, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = F.cross_entropy(x @ weight + bias, y) + weight_decay * weight.square().sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    w, b = weight.detach(), bias.detach()
    return lambda queries: (torch.from_numpy(queries).double() @ w + b).argmax(dim=1).numpy()


def knn_accuracy(queries: np.ndarray, query_labels: np.ndarray, bank: np.ndarray, bank_labels: np.ndarray, k: int,
                 temperature: float) -> float:  # fmt: skip
    """Top-1 accuracy of weighted kNN (queries and bank L2-normalised; unlabelled rows, label < 0, left out)."""
    q, ql = queries[query_labels >= 0], query_labels[query_labels >= 0]
    b, bl = bank[bank_labels >= 0], bank_labels[bank_labels >= 0]
    k = min(k, len(b))
    similarity = q @ b.T  # (Q, B) cosines
    nearest = np.argsort(-similarity, axis=1, kind="stable")[:, :k]
    votes = np.zeros((len(q), int(max(bl.max(), ql.max())) + 1))
    weights = np.exp(np.take_along_axis(similarity, nearest, axis=1) / temperature)
    np.add.at(votes, (np.arange(len(q))[:, None], bl[nearest]), weights)
    return float((votes.argmax(axis=1) == ql).mean())
