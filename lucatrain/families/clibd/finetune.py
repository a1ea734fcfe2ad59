"""CLIBD's fine-tuning stage (`model.model_type=clibd_finetune`, CLIBD's `fine_tuning_set`): a linear
taxon classifier on the image tower of a contrastive export, trained in its own run, scored on the
seen and the unseen query splits.

    lucatrain train --config clibd_finetune model.model_dirpath=runs/clibd/best

The model is CLIBD's `method_linear`:

    logits = Linear(output_dim -> classes)(tower.proj(tower.features(image)))   (the projection before
                                                                                 L2 normalisation)

trained with cross entropy on the classes (`clibd_finetune.level`, species by default) of the
training group (`seen_keys`: BIOSCAN-5M's `train` split), the image tower trained too unless
`clibd_finetune.freeze_tower`. A classifier cannot name a species it never saw, so evaluation
combines it, as CLIBD does, with the contrastive model itself (frozen, from `model.model_dirpath`):
for the k-th guess of each query image, the classifier's k-th class if its softmax confidence is
above a threshold, otherwise the taxon of the k-th nearest `unseen_keys` DNA barcode to the query's
image embedding. The threshold (0, 0.001, ..., 1) is the one with the best harmonic mean of seen and
unseen top-1 accuracy at the trained level (CLIBD's search, on the dev splits evaluated).

Reported per query split (`eval/<split>/...`): `classifier/<level>/top<k>_micro` (the classifier
alone) and `<level>/top<k>_<micro|macro>` (combined) for every rank from order down to the trained
one; under the key split: `hm/<level>/top<k>_<micro|macro>` and `threshold`. With
`clibd_finetune.unseen_keys` empty only the classifier is scored.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from lucatrain import dist
from lucatrain.config import ConfigError
from lucatrain.data.clibd_hdf5 import RANKS
from lucatrain.families import register_family
from lucatrain.families.base import Family
from lucatrain.families.clibd.config import LEVELS
from lucatrain.families.clibd.data import COLUMNS, ClibdCollator, ClibdRecipe, hdf5_files_of, name_id
from lucatrain.families.clibd.family import INFO, WEIGHTS, inference_collator, load_clibd
from lucatrain.families.clibd.task import gather_split
from lucatrain.retrieval import harmonic_mean, nearest_keys, topk_accuracy
from lucatrain.task import Metric, Task, higher_is_better, lower_is_better, normalised_loss

IGNORE = -100
CLASSIFIER_INFO = "classifier.json"
THRESHOLDS = np.linspace(0.0, 1.0, 1001)


@dataclass
class ClibdFinetuneConfig:
    level: str = "species"
    """The rank the classifier predicts (CLIBD: species)."""
    train_group: str = "seen_keys"
    """The HDF5 group (or BIOSCAN-5M split) the classifier trains on (CLIBD: the train split, `seen_keys`)."""
    seen_split: str = "val_seen"
    unseen_split: str = "val_unseen"
    """The dev splits of seen and of unseen species; the threshold is chosen on both."""
    unseen_keys: str = "unseen_keys"
    """The dev split whose DNA barcodes name the unseen taxa (retrieved by the contrastive model); empty:
    the classifier alone."""
    freeze_tower: bool = False
    """Train the head alone (a linear probe); CLIBD trains the image tower too."""
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    image_dir: str = ""
    """The image folder of BIOSCAN-5M metadata tables (as `clibd.image_dir`)."""

    def validate(self) -> None:
        if self.level not in LEVELS:
            raise ConfigError(f"`clibd_finetune.level` must be one of {list(LEVELS)}, got {self.level!r}")
        if not self.ks or min(self.ks) < 1:
            raise ConfigError(f"`clibd_finetune.ks` must be positive integers, got {self.ks}")

    def levels(self) -> list[str]:
        """The ranks scored: from order down to the trained one."""
        return list(LEVELS[: LEVELS.index(self.level) + 1])


@dataclass
class LabelledCollator:
    """The contrastive run's collator (image views, DNA tokens for the keys) plus `target`: the class
    of each specimen's taxon, IGNORE for a taxon outside the classes or a specimen without an image."""

    inputs: ClibdCollator
    classes: dict[str, int]
    level: str

    def __call__(self, rows: dict, epoch: int) -> dict[str, torch.Tensor]:
        out = self.inputs(rows, epoch)
        target = [self.classes.get(name, IGNORE) if has_image else IGNORE for name, has_image in zip(rows[self.level], rows["has_image"])]
        out["target"] = torch.tensor(target, dtype=torch.int64)
        return out


class ClassifierTask(Task):
    def __init__(self, tower: torch.nn.Module, class_taxa: np.ndarray, cfg: ClibdFinetuneConfig, contrastive=None):
        """`tower`: the image tower to fine-tune; `class_taxa` (classes, 4): each class's taxon ids per
        rank; `contrastive`: the frozen contrastive Task whose image and DNA towers retrieve unseen taxa."""
        super().__init__()
        self.tower = tower.requires_grad_(not cfg.freeze_tower)
        self.head = torch.nn.Linear(tower.proj.out_features, len(class_taxa))
        self.class_taxa = class_taxa
        self.cfg = cfg
        # A plain list, not a submodule: the frozen model is neither trained nor checkpointed by DeepSpeed.
        self._contrastive = [contrastive] if contrastive is not None else []

    def logits(self, batch: dict) -> torch.Tensor:
        return self.head(self.tower.proj(self.tower.features(batch))).float()

    def count_targets(self, batch: dict) -> dict[str, float]:
        return {"samples": float((batch["target"] != IGNORE).sum())}

    def forward(self, batch: dict, totals: dict[str, float] | None):
        """(loss, report) for training; with `totals` None (evaluation), (None, {"logits"})."""
        logits = self.logits(batch)
        if totals is None:
            return None, {"logits": logits}
        target = batch["target"]
        labelled = target != IGNORE
        loss_sum = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="sum")
        report = {"loss_sum": loss_sum.detach(), "count": labelled.sum().float(),
                  "correct": ((logits.argmax(dim=-1) == target) & labelled).sum().float()}  # fmt: skip
        return normalised_loss(None, {"samples": loss_sum}, {}, totals), report

    def metrics(self) -> dict[str, Metric]:
        declared = {"loss": lower_is_better("loss"), "acc": higher_is_better("acc"), "threshold": higher_is_better("threshold")}
        for level in self.cfg.levels():
            for k in self.cfg.ks:
                declared[f"classifier/{level}/top{k}_micro"] = higher_is_better(f"classifier/{level}/top{k}_micro")
                for kind in ("micro", "macro"):
                    name = f"{level}/top{k}_{kind}"
                    declared[name], declared[f"hm/{name}"] = higher_is_better(name), higher_is_better(f"hm/{name}")
        return declared

    def summarize(self, sums: dict) -> dict[str, float]:
        n = float(sums.get("count", 0.0))
        return {"loss": float(sums["loss_sum"]) / n, "acc": float(sums["correct"]) / n} if n > 0 else {}

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, splits: dict, engine) -> dict[str, dict[str, float]]:
        c = self.cfg
        contrastive = self._contrastive[0] if self._contrastive else None
        if contrastive is not None:
            contrastive.to(engine.device)
        engine.eval()
        try:
            gathered = {}
            for name, split in splits.items():
                is_keys = name == c.unseen_keys

                def outputs(batch, is_keys=is_keys):
                    out = {"taxon_ids": batch["taxon_ids"], "image_present": batch["image_present"].to(torch.int64)}
                    if is_keys:
                        out["dna"] = contrastive.towers["dna"](batch).float()
                    else:
                        out["logits"] = engine(batch, None)[1]["logits"]
                        if contrastive is not None:
                            out["image"] = contrastive.towers["image"](batch).float()
                    return out

                gathered[name] = gather_split(split, engine.device, outputs)
        finally:
            engine.train()
        results = score(gathered, self.class_taxa, c) if dist.is_main() else None
        return dist.broadcast_object(results)


def score(gathered: dict, class_taxa: np.ndarray, c: ClibdFinetuneConfig) -> dict[str, dict[str, float]]:
    """Metrics (module docstring) from each split's gathered outputs: `logits`, `image` (the frozen
    model's query embeddings), `taxon_ids`, `image_present`; the key split's `dna` and `taxon_ids`."""
    k_max = min(max(c.ks), len(class_taxa))
    keys = gathered.get(c.unseen_keys) if c.unseen_keys else None
    if keys is not None:
        k_max = min(k_max, len(keys["dna"]))
    ks = [k for k in c.ks if k <= k_max]
    column = RANKS.index(c.level)
    guesses = {}  # split -> (truth (Q, 4), classifier guesses (Q, k, 4), confidences (Q, k), retrieved (Q, k, 4) or None)
    for split, out in gathered.items():
        if split == c.unseen_keys:
            continue
        queries = out["image_present"].astype(bool) & (out["taxon_ids"][:, column] >= 0)
        if not queries.any():
            continue
        probs = torch.softmax(torch.from_numpy(out["logits"][queries]), dim=-1)
        confidence, classes = probs.topk(k_max, dim=-1)
        retrieved = None
        if keys is not None:
            neighbours = nearest_keys(out["image"][queries], keys["dna"], k_max)
            retrieved = keys["taxon_ids"][neighbours]
        guesses[split] = (out["taxon_ids"][queries], class_taxa[classes.numpy()], confidence.numpy(), retrieved)

    threshold = None
    seen, unseen = guesses.get(c.seen_split), guesses.get(c.unseen_split)
    if keys is not None and seen is not None and unseen is not None:
        threshold = best_threshold([seen, unseen], column)

    results: dict[str, dict[str, float]] = {}
    for split, (truth, predicted, confidence, retrieved) in guesses.items():
        scores = {}
        combined = predicted if threshold is None else combine(predicted, confidence, retrieved, threshold)
        for level in c.levels():
            col = RANKS.index(level)
            known = truth[:, col] >= 0  # an unclassified rank is nobody's answer
            if not known.any():
                continue
            for name, value in _accuracy(truth[known, col], predicted[known][..., col], ks).items():
                if name.endswith("_micro"):
                    scores[f"classifier/{level}/{name}"] = value
            found = _accuracy(truth[known, col], combined[known][..., col], ks)
            scores.update({f"{level}/{name}": value for name, value in found.items()})
        results[split] = scores
    if threshold is not None:
        pair = results[c.seen_split], results[c.unseen_split]
        hm = {f"hm/{name}": harmonic_mean([pair[0][name], pair[1][name]]) for name in pair[0] if name in pair[1] and not name.startswith("classifier/")}
        results[c.unseen_keys] = {**hm, "threshold": float(threshold)}
    return results


def combine(predicted: np.ndarray, confidence: np.ndarray, retrieved: np.ndarray, threshold: float) -> np.ndarray:
    """(Q, k, 4) final guesses: the classifier's k-th where its confidence is above `threshold`, else the retrieved k-th."""
    return np.where((confidence > threshold)[..., None], predicted, retrieved)


def best_threshold(splits: list, column: int) -> float:
    """The threshold of THRESHOLDS with the best harmonic mean of the splits' top-1 accuracy at
    `column` (the first one on ties, as CLIBD's search)."""
    best, best_score = 0.0, -1.0
    for threshold in THRESHOLDS:
        accuracies = [float((combine(p[:, :1], q[:, :1], r[:, :1], threshold)[:, 0, column] == truth[:, column]).mean())
                      for truth, p, q, r in splits]  # fmt: skip
        score = harmonic_mean(accuracies)
        if score > best_score:
            best, best_score = float(threshold), score
    return best


def _accuracy(truth: np.ndarray, guesses: np.ndarray, ks: list[int]) -> dict[str, float]:
    """top-k micro/macro of (Q,) true labels against (Q, k) guessed labels (retrieval's arithmetic)."""
    rows, k = guesses.shape
    return topk_accuracy(truth, guesses.reshape(-1), np.arange(rows * k).reshape(rows, k), ks)


@register_family
class ClibdFinetuneFamily(Family):
    name = "clibd_finetune"
    config_sections = {"clibd_finetune": ClibdFinetuneConfig}

    @classmethod
    def check_config(cls, cfg) -> None:
        c = cfg.clibd_finetune
        if not cfg.model.model_dirpath:
            raise ConfigError("`model.model_dirpath`: the CLIBD export to fine-tune (a contrastive run's best/ or last/)")
        splits = set(cfg.data.dev_splits)
        if cfg.data.dev_files:
            raise ConfigError("`data.dev_files`: a CLIBD dev split is read from the HDF5 group of its name; list the splits in "
                              f"`data.dev_splits` ({c.seen_split}, {c.unseen_split}, {c.unseen_keys})")  # fmt: skip
        if splits and c.unseen_keys and c.unseen_keys not in splits:
            raise ConfigError(f"`clibd_finetune.unseen_keys` ({c.unseen_keys!r}) must be one of the dev splits {sorted(splits)}, "
                              "or empty to score the classifier alone")  # fmt: skip

    def contrastive_export(self) -> tuple[dict, Path]:
        directory = Path(self.cfg.model.model_dirpath)
        for name in (WEIGHTS, INFO):
            if not (directory / name).is_file():
                raise ValueError(f"`model.model_dirpath={directory}`: {name} not found; point it at a CLIBD run's best/ or last/")
        info = json.loads((directory / INFO).read_text(encoding="utf-8"))
        if "image" not in info["clibd"]["modalities"]:
            raise ValueError(f"`model.model_dirpath={directory}`: the export has no image tower (its towers: {info['clibd']['modalities']})")
        if self.cfg.clibd_finetune.unseen_keys and "dna" not in info["clibd"]["modalities"]:
            raise ValueError(f"`model.model_dirpath={directory}`: the export has no DNA tower to retrieve unseen taxa with; "
                             "set `clibd_finetune.unseen_keys=''` to score the classifier alone")  # fmt: skip
        return info, directory

    def prepare_recipe(self, split: str | None = None) -> ClibdRecipe:
        c = self.cfg.clibd_finetune
        return ClibdRecipe(c.train_group if split is None else split, c.image_dir)

    def setup(self, train_data, dev_data: dict) -> None:
        self.info, self.export_dir = self.contrastive_export()
        level = self.cfg.clibd_finetune.level
        rows = train_data.rows(np.arange(len(train_data)), list(RANKS) + ["has_image"])
        taxa: dict[str, tuple] = {}
        for i, name in enumerate(rows[level]):
            if rows["has_image"][i] and name_id(name) >= 0:
                taxa.setdefault(name, tuple(name_id(rows[rank][i]) for rank in RANKS))
        if not taxa:
            raise ValueError(f"the training data ({len(train_data)} specimens) has no image with a {level} name: nothing to classify")
        names = sorted(taxa)
        self.classes = {name: i for i, name in enumerate(names)}
        self.class_taxa = np.array([taxa[name] for name in names], dtype=np.int64).reshape(-1, len(RANKS))
        self.files = {group: path for data in [train_data, *dev_data.values()] for group, path in hdf5_files_of(data).items()}
        if dist.is_main():
            self.logger.info("classifier over %d %s names of %s, on the image tower of %s", len(names), level,
                             self.cfg.clibd_finetune.train_group, self.export_dir)  # fmt: skip

    def columns(self) -> tuple[str, ...]:
        return COLUMNS

    def collator(self) -> LabelledCollator:
        modalities = ("image", "dna") if self.cfg.clibd_finetune.unseen_keys else ("image",)
        inputs = dataclasses.replace(inference_collator(self.info), files=self.files, modalities=modalities, seed=self.cfg.train.seed)
        return LabelledCollator(inputs, self.classes, self.cfg.clibd_finetune.level)

    def build_task(self, resume_from: Path | None = None) -> ClassifierTask:
        contrastive, _ = load_clibd(self.export_dir)
        tower = copy.deepcopy(contrastive.towers["image"]).train()  # the copy that is trained
        frozen = contrastive.requires_grad_(False) if self.cfg.clibd_finetune.unseen_keys else None
        self.task = ClassifierTask(tower, self.class_taxa, self.cfg.clibd_finetune, frozen)
        return self.task

    def describe(self) -> str:
        trained = sum(p.numel() for p in self.task.parameters() if p.requires_grad) / 1e6
        return f"classes={len(self.classes)} ({self.cfg.clibd_finetune.level}) trained={trained:.2f}M"

    def resume_state(self) -> dict:
        c = self.cfg.clibd_finetune
        return {"classes": len(self.classes), "level": c.level, "freeze_tower": c.freeze_tower,
                "contrastive_export": str(self.export_dir)}  # fmt: skip

    def export_info(self, task) -> dict:
        return {"level": self.cfg.clibd_finetune.level, "classes": sorted(self.classes, key=self.classes.get),
                "contrastive_export": str(self.export_dir), "clibd": self.info["clibd"], "seed": self.cfg.train.seed}  # fmt: skip

    @classmethod
    def export(cls, directory: Path, state: dict, info: dict, with_heads: bool = True) -> None:
        """model.safetensors (the image tower and the head, fp32) and classifier.json (level, class
        names in head order, the contrastive export it started from): `load_classifier(directory)`."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(directory / WEIGHTS),
                  metadata={"format": "pt"})  # fmt: skip
        (directory / CLASSIFIER_INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")


def load_classifier(directory) -> tuple[ClassifierTask, list[str]]:
    """The fine-tuned classifier (eval mode, CPU, no retrieval) and its class names, from an export."""
    from lucatrain.families.clibd.family import _clibd_config
    from lucatrain.families.clibd.towers import ImageTower

    directory = Path(directory)
    for name in (WEIGHTS, CLASSIFIER_INFO):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a clibd_finetune export: best/ or last/ of a run)")
    info = json.loads((directory / CLASSIFIER_INFO).read_text(encoding="utf-8"))
    c = _clibd_config(info["clibd"])
    image = dataclasses.replace(c.image, pretrained="")  # built from its config; the weights are the export's
    tower = ImageTower(image, c.output_dim, dropout=0.0)
    task = ClassifierTask(tower, np.zeros((len(info["classes"]), len(RANKS)), dtype=np.int64),
                          ClibdFinetuneConfig(level=info["level"], unseen_keys=""))  # fmt: skip
    state = load_file(str(directory / WEIGHTS))
    task.load_state_dict({key: state[key] for key in task.state_dict()})
    return task.eval(), info["classes"]
