"""The CLIBD Task: towers + learnable temperature + the contrastive loss; retrieval as evaluation.

Training. Each micro-batch's loss is the global contrastive loss of that micro-batch (every rank's
rows, `lucatrain.contrastive`), divided by the micro-batches per step, so a step's gradient is the
mean over its micro-batches at any world size. The report holds, summable over micro-batches and
ranks, the loss, each pair's loss and exp(logit_scale), each already divided by the step's
micro-batch count (`steps` counts optimizer steps), so `summarize` returns per-step means.

Evaluation (CLIBD's): every dev split is embedded by every tower (each rank a shard, gathered); each
query split is scored against the key split (`clibd.key_split`) for every query tower x key tower,
by faiss inner product, as top-k accuracy of the keys' taxa at each level, micro and macro:
`<split>/<query>_to_<key>/<level>/top<k>_<micro|macro>`. The key split itself reports the harmonic
mean of the seen and unseen query splits as `hm/<query>_to_<key>/<level>/top<k>_<micro|macro>`.
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from lucatrain import dist
from lucatrain.contrastive import LOGIT_SCALE_INIT, ContrastiveLoss, grad_cache_step
from lucatrain.data.clibd_hdf5 import RANKS
from lucatrain.retrieval import harmonic_mean, nearest_keys, topk_accuracy
from lucatrain.task import EVAL_EPOCH, Metric, Task, higher_is_better, lower_is_better, to_device


class ClibdTask(Task):
    def __init__(self, towers: torch.nn.ModuleDict, loss: ContrastiveLoss, fix_temperature: bool, multi_positive: str,
                 ks, levels, key_split: str, seen_split: str, unseen_split: str, retrieval=(), grad_cache: bool = False):  # fmt: skip
        super().__init__()
        self.towers = towers
        self.loss = loss
        # Shape (1,), not (): DeepSpeed cannot partition a 0-dim parameter across ranks.
        self.logit_scale = torch.nn.Parameter(torch.full((1,), LOGIT_SCALE_INIT), requires_grad=not fix_temperature)
        self.positive_rank = RANKS.index(multi_positive) if multi_positive else None
        self.ks, self.levels = list(ks), list(levels)
        self.key_split, self.seen_split, self.unseen_split = key_split, seen_split, unseen_split
        self.grad_cache = grad_cache
        towers = list(towers)
        self.retrieval = [tuple(name.split("_to_")) for name in retrieval] or list(itertools.product(towers, towers))

    # ------------------------------------------------------------------ training

    def present(self, batch: dict, rows: int) -> dict[str, torch.Tensor]:
        """Which samples carry each modality: the image where the collator says so, the rest always."""
        device = self.logit_scale.device
        out = {m: torch.ones(rows, dtype=torch.bool, device=device) for m in self.towers}
        if "image_present" in batch and "image" in out:
            out["image"] = batch["image_present"].to(device=device, dtype=torch.bool)
        return out

    def count_targets(self, batch: dict) -> dict[str, float]:
        return {"micro_batches": 1.0}

    def embed(self, batch: dict) -> dict[str, torch.Tensor]:
        return {modality: tower(batch) for modality, tower in self.towers.items()}

    def forward(self, batch: dict, totals: dict[str, float] | None):
        """(loss, report) for training; with `totals` None (evaluation), (None, embeddings)."""
        embeddings = self.embed(batch)
        if totals is None:
            return None, embeddings
        present = self.present(batch, len(batch["sample_ids"]))
        positives = batch["taxon_ids"][:, self.positive_rank] if self.positive_rank is not None else None
        share, report = self.loss(embeddings, present, self.logit_scale, positives)
        per_rank = totals["micro_batches"] / dist.world_size()  # this rank's micro-batches in the step
        share_of_step = 1.0 / (per_rank * dist.world_size())  # summed over every micro-batch of every rank: 1
        out = {"loss_total": share.detach() / per_rank, "steps": torch.tensor(share_of_step),
               "logit_scale_total": self.logit_scale.detach().exp().reshape(()) * share_of_step}  # fmt: skip
        for key, value in report.items():
            if key.endswith("/loss"):
                out[f"{key}_total"] = value * share_of_step
        return share / per_rank, out

    def train_step(self, micro_batches: list[dict], engine) -> dict:
        """Plain: every micro-batch is its own contrastive batch (the default step). GradCache
        (`clibd.grad_cache`): the whole step, every micro-batch of every rank, is one contrastive batch,
        embedded chunk by chunk without a graph and backpropagated chunk by chunk (`grad_cache_step`), so
        the batch's negatives can far outnumber what the towers' activations allow in memory."""
        if not self.grad_cache:
            return super().train_step(micro_batches, engine)
        batches = [to_device(mb, engine.device) for mb in micro_batches]
        sample_ids = torch.cat([b["sample_ids"] for b in batches])
        present = self.present({k: torch.cat([b[k] for b in batches]) for k in ("image_present",) if k in batches[0]}, len(sample_ids))
        positives = torch.cat([b["taxon_ids"] for b in batches])[:, self.positive_rank] if self.positive_rank is not None else None

        def backward(surrogate):
            engine.backward(surrogate)
            engine.step()  # DeepSpeed updates at the accumulation boundary: after the last chunk

        share, report = grad_cache_step(lambda batch: engine(batch, None)[1], batches,
                                        lambda embeddings, scale: self.loss(embeddings, present, scale, positives),
                                        self.logit_scale, backward)  # fmt: skip
        share_of_step = 1.0 / dist.world_size()
        out = {"loss_total": float(share), "steps": share_of_step,
               "logit_scale_total": float(self.logit_scale.detach().exp()) * share_of_step}  # fmt: skip
        out.update({f"{key}_total": float(value) * share_of_step for key, value in report.items() if key.endswith("/loss")})
        return out

    def metrics(self) -> dict[str, Metric]:
        declared = {"loss": lower_is_better("loss"), "logit_scale": higher_is_better("logit_scale")}
        for a, b in self.loss.pairs:
            declared[f"{a}_{b}/loss"] = lower_is_better(f"{a}_{b}/loss")
        for name in self.retrieval_names():
            declared[name] = higher_is_better(name)
            declared[f"hm/{name}"] = higher_is_better(f"hm/{name}")
        return declared

    def summarize(self, sums: dict) -> dict[str, float]:
        steps = float(sums.get("steps", 0.0))
        if steps <= 0:
            return {}
        out = {"loss": float(sums["loss_total"]) / steps, "logit_scale": float(sums["logit_scale_total"]) / steps}
        for key, value in sums.items():
            if key.endswith("/loss_total"):
                out[key[: -len("_total")]] = float(value) / steps
        return out

    # ------------------------------------------------------------------ evaluation

    def retrieval_names(self) -> list[str]:
        return [f"{q}_to_{k}/{level}/top{n}_{kind}" for q, k in self.retrieval for level in self.levels
                for n in self.ks for kind in ("micro", "macro")]  # fmt: skip

    def embed_split(self, split, engine) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Every tower's embeddings of a whole split (every rank gets all rows) and its taxon ids (N, 4)."""

        def outputs(batch):
            out = {m: value.float() for m, value in engine(batch, None)[1].items()}
            out["taxon_ids"] = batch["taxon_ids"]
            if "image" in self.towers:  # a specimen without an image is neither an image query nor an image key
                out["image_present"] = self.present(batch, len(batch["sample_ids"]))["image"].to(torch.int64)
            return out

        gathered = gather_split(split, engine.device, outputs)
        if "image_present" in gathered:
            gathered["image_present"] = gathered["image_present"].astype(bool)
        return gathered, gathered.pop("taxon_ids")

    def evaluate(self, splits: dict, engine) -> dict[str, dict[str, float]]:
        engine.eval()
        try:
            embedded = {name: self.embed_split(split, engine) for name, split in splits.items()}
        finally:
            engine.train()
        if self.key_split not in embedded:
            return {}
        results = None
        if dist.is_main():
            results = self.score(embedded)
        return dist.broadcast_object(results)

    def score(self, embedded: dict) -> dict[str, dict[str, float]]:
        keys, key_taxa = embedded[self.key_split]
        results: dict[str, dict[str, float]] = {}
        k_max = min(max(self.ks), len(key_taxa))
        ks = [k for k in self.ks if k <= k_max]
        for split, (queries, query_taxa) in embedded.items():
            if split == self.key_split or not len(query_taxa):
                continue
            scores = {}
            for q, k in self.retrieval:
                query_rows, key_rows = _rows_with(queries, q), _rows_with(keys, k)
                neighbours = nearest_keys(queries[q][query_rows], keys[k][key_rows], min(k_max, int(key_rows.sum())))
                for level in self.levels:
                    column = RANKS.index(level)
                    known = query_taxa[query_rows, column] >= 0  # an unclassified query has nothing to retrieve
                    if not known.any():
                        continue
                    found = topk_accuracy(query_taxa[query_rows][known, column], key_taxa[key_rows, column], neighbours[known],
                                          [n for n in ks if n <= neighbours.shape[1]])  # fmt: skip
                    scores.update({f"{q}_to_{k}/{level}/{name}": value for name, value in found.items()})
            results[split] = scores
        seen, unseen = results.get(self.seen_split), results.get(self.unseen_split)
        if seen and unseen:
            results[self.key_split] = {f"hm/{name}": harmonic_mean([seen[name], unseen[name]]) for name in seen if name in unseen}
        return results


@torch.no_grad()
def gather_split(split, device, outputs) -> dict[str, np.ndarray]:
    """`outputs(batch)` ({name: (rows, ...) tensor}) over a whole split, each rank a shard, gathered:
    every rank gets every row, in the same order for every name (collective: call on every rank)."""
    parts: dict[str, list] = {}
    for rows, is_padding in split.rank_batches(dist.world_size(), dist.rank()):
        batch = to_device(split.collate(split.data.rows(rows, split.columns), EVAL_EPOCH), device)
        keep = 0 if is_padding else len(rows)
        for name, value in outputs(batch).items():
            parts.setdefault(name, []).append(value[:keep])
    return {name: dist.all_gather_with_grad(torch.cat(values)).cpu().numpy() for name, values in sorted(parts.items())}


def _rows_with(embedded: dict, modality: str) -> np.ndarray:
    """Which rows of a split carry `modality` (every row, but for images where a specimen had none)."""
    rows = len(next(v for key, v in embedded.items() if key != "image_present"))
    if modality == "image" and "image_present" in embedded:
        return embedded["image_present"]
    return np.ones(rows, dtype=bool)
