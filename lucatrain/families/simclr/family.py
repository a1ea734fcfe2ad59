"""The SimCLR family (`model.model_type=simclr`): self-supervised image pretraining with NT-Xent, on
photographs and multispectral stacks, through the generic trainer (DeepSpeed, the ledger and exact
resume, checkpoints, best/ by a declared metric).

See data.py (inputs, views), model.py (backbones, projection head), task.py (loss and evaluation)
and config.py (the Phenoscape config keys and where they live). The export is the backbone:
`backbone/` (a transformers directory, or timm's config.json + model.safetensors) plus simclr.json;
`load_backbone(dir)` gives it back with the evaluation view.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from lucatrain import dist
from lucatrain.callbacks import StepCallback
from lucatrain.config import ConfigError, dev_inputs
from lucatrain.data.simclr_views import SimclrAugment
from lucatrain.families import register_family
from lucatrain.families.base import Family
from lucatrain.families.simclr.config import SimclrConfig
from lucatrain.families.simclr.data import COLUMNS, SimclrCollator, SimclrRecipe
from lucatrain.families.simclr.model import Backbone, ProjectionHead
from lucatrain.families.simclr.task import SimclrTask

WEIGHTS, INFO = "model.safetensors", "simclr.json"


def augment_of(c: SimclrConfig) -> SimclrAugment:
    # The same parameters by name (the config's input_size is the augment's size): a field added to
    # one and not the other is a TypeError here, not a silently shifted argument.
    values = dataclasses.asdict(c.transforms)
    return SimclrAugment(size=values.pop("input_size"), **values)


@register_family
class SimclrFamily(Family):
    name = "simclr"
    config_sections = {"simclr": SimclrConfig}

    @classmethod
    def check_config(cls, cfg) -> None:
        c = cfg.simclr
        splits = set(dev_inputs(cfg))
        if c.knn_bank and c.knn_bank not in splits:
            raise ConfigError(f"`simclr.knn_bank` ({c.knn_bank!r}) must be one of the dev splits {sorted(splits)}: its labelled "
                              "images are the kNN classifier's memory")  # fmt: skip

    def prepare_recipe(self, split: str | None = None) -> SimclrRecipe:
        data = self.cfg.data
        inputs = list(data.train_files) + list(data.dev_files) + [f for files in data.dev_splits.values() for f in files]
        return SimclrRecipe([str(p) for p in inputs])

    def setup(self, train_data, dev_data: dict) -> None:
        self.channels = int(train_data.meta.get("channels", 0))
        for name, data in dev_data.items():
            theirs = int(data.meta.get("channels", 0))
            if theirs and theirs != self.channels:
                raise ValueError(f"dev split {name!r} ({data.path}) has {theirs}-channel images, the training data {self.channels}")
        labels = sorted({label for data in dev_data.values() for label in data.meta.get("labels", [])})
        self.labels = {label: i for i, label in enumerate(labels)}
        if dist.is_main():
            self.logger.info("images of %d channel(s)%s", self.channels,
                             "" if self.channels == 3 else ": colour jitter and greyscale are skipped (RGB only)")  # fmt: skip

    def columns(self) -> tuple[str, ...]:
        return COLUMNS

    def collator(self) -> SimclrCollator:
        return SimclrCollator(augment_of(self.cfg.simclr), self.cfg.train.seed, self.channels, self.labels)

    def build_task(self, resume_from: Path | None = None) -> SimclrTask:
        c = self.cfg.simclr
        # A resume gets its weights from the checkpoint: the starting weights are not read again.
        weights = "" if resume_from is not None else c.weights
        backbone = Backbone(c.backbone, self.channels, c.transforms.input_size, weights, c.backbone_library)
        head = ProjectionHead(backbone.num_features, c.proj_hidden_dim, c.proj_output_dim)
        self.task = SimclrTask(backbone, head, c.temperature, c.knn_bank, c.knn_k, c.knn_temperature, c.linear_probe)
        return self.task

    def callbacks(self, task) -> list:
        return [ViewPairLogger(self.cfg.simclr.log_views_steps)] if self.cfg.simclr.log_views_steps else []

    def describe(self) -> str:
        n = sum(p.numel() for p in self.task.backbone.parameters()) / 1e6
        return f"backbone={self.cfg.simclr.backbone} ({n:.2f}M, in_chans={self.channels})"

    def resume_state(self) -> dict:
        c = self.cfg.simclr
        return {"backbone": c.backbone, "library": c.backbone_library, "channels": self.channels, "input_size": c.transforms.input_size,
                "proj": [c.proj_hidden_dim, c.proj_output_dim]}  # fmt: skip

    def export_info(self, task) -> dict:
        return {"simclr": dataclasses.asdict(self.cfg.simclr), "channels": self.channels, "kind": task.backbone.kind,
                "num_features": task.backbone.num_features, "labels": sorted(self.labels, key=self.labels.get)}  # fmt: skip

    @classmethod
    def export(cls, directory: Path, state: dict, info: dict, with_heads: bool = True) -> None:
        """model.safetensors (backbone and head, fp32), simclr.json, and backbone/: the backbone alone as
        its library saves it (transformers: save_pretrained; timm: config.json + model.safetensors)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in state.items()}, str(directory / WEIGHTS), metadata={"format": "pt"})
        (directory / INFO).write_text(json.dumps(info, indent=1) + "\n", encoding="utf-8")
        task = _task_from(info, state)
        model = task.backbone.model
        if task.backbone.kind == "timm":
            out = directory / "backbone"
            out.mkdir(exist_ok=True)
            config = {"architecture": info["simclr"]["backbone"], "num_classes": 0, "num_features": info["num_features"],
                      "model_args": {"in_chans": info["channels"]}}  # fmt: skip
            (out / "config.json").write_text(json.dumps(config, indent=1) + "\n", encoding="utf-8")
            save_file({k: v.detach().float().contiguous() for k, v in model.state_dict().items()}, str(out / WEIGHTS))
        else:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()
            model.save_pretrained(directory / "backbone")


class ViewPairLogger(StepCallback):
    """Writes the two views of the first 4 training images to TensorBoard (tag `views`: a grid, one row
    per image, view a | view b) at the start and every `every` steps, from rank 0. The views are those
    of the epoch the step number names, drawn from (seed, epoch, sample id): logging them changes no
    random state of training. Multispectral stacks show their first band as grey."""

    name = "simclr_views"

    def __init__(self, every: int, images: int = 4):
        self.every, self.images = every, images
        self.trainer = None

    def on_start(self, trainer) -> None:
        self.trainer = trainer
        self.log(trainer.global_step)

    def after_step(self, engine) -> None:
        step = engine.global_steps
        if self.trainer is not None and step % self.every == 0:
            self.log(step)

    def log(self, step: int) -> None:
        writer = getattr(self.trainer.monitor, "writer", None) if self.trainer is not None else None
        if writer is None or not dist.is_main():
            return
        data, rows = self.trainer.train_data, self.trainer.train_rows[: self.images]
        batch = self.trainer.collator(data.rows(rows, self.trainer.columns), step)
        grid = torch.cat([torch.cat([shown(a), shown(b)], dim=2) for a, b in zip(batch["view_a"], batch["view_b"])], dim=1)
        writer.add_image("views", grid, step)


def shown(view: torch.Tensor) -> torch.Tensor:
    """A view as a displayable (3, H, W) image in [0, 1] (ImageNet normalisation undone for RGB)."""
    from lucatrain.data.simclr_views import IMAGENET_MEAN, IMAGENET_STD

    if view.shape[0] == 3:
        view = view * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
    else:
        view = view[:1].expand(3, -1, -1)
    return view.clamp(0, 1)


def _task_from(info: dict, state: dict) -> SimclrTask:
    c = _simclr_config(info["simclr"])
    backbone = Backbone(c.backbone, info["channels"], c.transforms.input_size, library="timm" if info["kind"] == "timm" else "transformers")
    task = SimclrTask(backbone, ProjectionHead(backbone.num_features, c.proj_hidden_dim, c.proj_output_dim), c.temperature)
    expected = task.state_dict()
    task.load_state_dict({key: state[key] for key in expected})
    return task.eval()


def _simclr_config(values: dict) -> SimclrConfig:
    from lucatrain.families.simclr.config import TransformsConfig

    values = dict(values)
    values["transforms"] = TransformsConfig(**values["transforms"])
    return SimclrConfig(**values)


def load_backbone(directory) -> tuple[torch.nn.Module, SimclrAugment]:
    """The trained backbone (eval mode, CPU: images (B, C, S, S) -> features (B, F)) and the augment
    whose `eval_view(image)` prepares an image for it, from an export (best/, last/)."""
    directory = Path(directory)
    for name in (WEIGHTS, INFO):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name} not found (expected a SimCLR export: best/ or last/ of a run)")
    info = json.loads((directory / INFO).read_text(encoding="utf-8"))
    task = _task_from(info, load_file(str(directory / WEIGHTS)))
    return task.backbone, augment_of(_simclr_config(info["simclr"]))


@torch.no_grad()
def embed(directory, paths) -> np.ndarray:
    """L2-normalised backbone features (N, F) of image files, as evaluation computes them."""
    import torch.nn.functional as F

    from lucatrain.data.simclr_views import load_image

    backbone, augment = load_backbone(directory)
    views = torch.stack([augment.eval_view(load_image(p)) for p in paths])
    return F.normalize(backbone(views), dim=-1).numpy()
