"""The Phenoscape SimCLR config (a YAML users come with) -> lucatrain overrides of the `simclr` recipe.

    lucatrain train --phenoscape their_config.yaml [section.key=value ...]

Every key of that config is accepted; each maps as config.py's table says. Keys with no effect here
are accepted and named in the log (pin_memory, persistent_workers: the loader's own choice;
deterministic: lucatrain's sample order, views and initialisation are always functions of the seed).
An unknown key is an error naming it. `data_dir` is the image folder; when it holds `train/` and
`val/` folders those are the training and validation splits (val also the kNN bank's queries, train
the bank), otherwise the whole folder trains and nothing is validated.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from lucatrain.config import ConfigError

TRANSFORM_KEYS = ("input_size", "cj_prob", "cj_strength", "min_scale", "random_gray_scale", "gaussian_blur", "kernel_size", "sigmas")
NO_EFFECT = ("pin_memory", "persistent_workers", "deterministic")
PRECISIONS = {"16": "fp16", "16-mixed": "fp16", "bf16": "bf16", "bf16-mixed": "bf16", "32": "fp32", "32-true": "fp32"}
STRATEGIES = {"auto": "zero0", "ddp": "zero0", "deepspeed": "zero2", "deepspeed_stage_1": "zero1", "deepspeed_stage_2": "zero2",
              "deepspeed_stage_3": "zero3", "deepspeed_stage_3_offload": "zero3_offload"}  # fmt: skip


def _value(value) -> str:
    """A YAML scalar/list as an override value (lists and dicts in flow style)."""
    if isinstance(value, (list, dict)):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if value is None:
        return "''"
    return str(value).lower() if isinstance(value, bool) else str(value)


def phenoscape_overrides(path) -> tuple[list[str], list[str]]:
    """(overrides, notes): the lucatrain overrides of Phenoscape config `path`, and what to log about keys without effect."""
    path = Path(path)
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"{path}: cannot read the Phenoscape config: {err}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: a Phenoscape config is a mapping of keys, got {type(config).__name__}")
    out, notes = [], []
    for key, value in config.items():
        where = f"{path}: `{key}`"
        if key == "data_dir":
            root = Path(value)
            if (root / "train").is_dir() and (root / "val").is_dir():
                out += [f"data.train_files=[{root / 'train'}]", f"data.dev_splits={{val: [{root / 'val'}], bank: [{root / 'train'}]}}"]
            else:
                out += [f"data.train_files=[{root}]", "data.dev_splits={}", "simclr.knn_bank=''", "train.best_metric=loss"]
                notes.append(f"{where}: no train/ and val/ folders in {root}: the whole folder trains, nothing is validated")
        elif key == "out_dir":
            out.append(f"train.output_dir={value}")
        elif key in ("backbone", "temperature"):
            out.append(f"simclr.{key}={value}")
        elif key == "weights":
            if isinstance(value, str) and value.upper() == "DEFAULT":
                raise ConfigError(f"{where}: DEFAULT means downloading pretrained weights, and this machine cannot; download them "
                                  "elsewhere and set `weights` to the local file or directory, or null for random init")  # fmt: skip
            out.append(f"simclr.weights={_value(value)}")
        elif key == "input_size":
            out.append(f"simclr.transforms.input_size={value}")
        elif key == "lr":
            out.append(f"train.learning_rate={value}")
        elif key == "batch_size":
            out.append(f"train.batch_size={value}")
        elif key == "max_epochs":
            out += [f"train.num_train_epochs={value}", "train.max_steps=0"]
        elif key == "seed":
            out.append(f"train.seed={value}")
        elif key == "accelerator":
            if value == "gpu":
                import torch

                if not torch.cuda.is_available():
                    raise ConfigError(f"{where}: gpu, and this machine has no CUDA device (use cpu or auto)")
            elif value not in ("cpu", "auto"):
                raise ConfigError(f"{where}: must be cpu, gpu or auto, got {value!r}")
        elif key == "devices":
            world = int(os.environ.get("WORLD_SIZE", "1"))
            if value not in ("auto", None) and int(value) != world:
                raise ConfigError(f"{where}: {value} devices, but this run has {world} process(es); start it with that many "
                                  f"(run_scripts/run_simclr.sh devices={value}, or the deepspeed / torchrun launcher)")  # fmt: skip
        elif key == "strategy":
            if str(value) not in STRATEGIES:
                raise ConfigError(f"{where}: {value!r} is not one of {sorted(STRATEGIES)}")
            out.append(f"deepspeed.config={STRATEGIES[str(value)]}")
        elif key == "num_workers":
            out.append(f"data.num_workers={value}")
        elif key in NO_EFFECT:
            notes.append(f"{where}={value}: accepted, no effect here ({'always deterministic' if key == 'deterministic' else 'the loader decides'})")
        elif key == "log_every_n_steps":
            out += [f"train.loss_logging_steps={value}", f"train.logging_steps={value}"]
        elif key == "precision":
            if str(value) not in PRECISIONS:
                raise ConfigError(f"{where}: {value!r} is not one of {sorted(PRECISIONS)}")
            out.append(f"deepspeed.precision={PRECISIONS[str(value)]}")
        elif key == "accumulate_grad_batches":
            out.append(f"train.gradient_accumulation_steps={value}")
        elif key == "lr_scheduler":
            out += _scheduler(value, where)
        elif key == "T_max":
            out.append(f"train.schedule_epochs={value}")
        elif key == "eta_min":
            out.append(f"train.lr2={value}")
        elif key == "early_stopping":
            out += _early_stopping(value, where)
        elif key == "transforms":
            if not isinstance(value, dict):
                raise ConfigError(f"{where}: a mapping of {list(TRANSFORM_KEYS)}")
            for name, item in value.items():
                if name not in TRANSFORM_KEYS:
                    raise ConfigError(f"{where}.{name}: unknown transform key; known: {list(TRANSFORM_KEYS)}")
                out.append(f"simclr.transforms.{name}={_value(item)}")
        elif key == "resume":
            out += _resume(value, where)
        else:
            raise ConfigError(f"{where}: not a Phenoscape SimCLR key lucatrain knows")
    return out, notes


def _scheduler(value, where: str) -> list[str]:
    """`lr_scheduler: cosine` or `lr_scheduler: {name: cosine, T_max, eta_min}`; T_max in epochs."""
    spec = {"name": value} if isinstance(value, str) else dict(value or {})
    name = spec.pop("name", spec.pop("type", "cosine"))
    if name not in ("cosine", "constant", "linear", "one_cycle"):
        raise ConfigError(f"{where}: {name!r}: lucatrain has cosine, linear, constant and one_cycle")
    out = [f"train.lr_scheduler={name}"]
    for key, item in spec.items():
        if key == "T_max":
            out.append(f"train.schedule_epochs={item}")
        elif key == "eta_min":
            out.append(f"train.lr2={item}")
        else:
            raise ConfigError(f"{where}.{key}: unknown scheduler key (T_max, eta_min)")
    return out


def _early_stopping(value, where: str) -> list[str]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: a mapping of monitor, patience, min_delta (, mode)")
    out = []
    for key, item in value.items():
        if key == "monitor":
            # Lightning logs `val_loss`; lucatrain's metrics are `<split>/<metric>`.
            item = f"val/{item[len('val_'):]}" if str(item).startswith("val_") else item
            out.append(f"train.early_stopping.monitor={item}")
        elif key in ("patience", "min_delta", "mode"):
            out.append(f"train.early_stopping.{key}={item}")
        else:
            raise ConfigError(f"{where}.{key}: unknown early_stopping key (monitor, patience, min_delta, mode)")
    return out


def _resume(value, where: str) -> list[str]:
    """Lightning's `--resume <out_dir>/last.ckpt` -> that run's newest lucatrain checkpoint."""
    if value in (None, False, ""):
        return []
    if value is True or value == "latest":
        return ["train.trained_checkpoint=latest"]
    given = Path(value)
    if given.is_dir() and (given / "manifest.json").is_file():
        return [f"train.trained_checkpoint={given}"]
    run_dir = given.parent if given.suffix == ".ckpt" else given
    if (run_dir / "checkpoints").is_dir():
        return [f"train.output_dir={run_dir}", "train.trained_checkpoint=latest"]
    raise ConfigError(f"{where}: {value}: not a lucatrain run directory or checkpoint (a Lightning .ckpt cannot be resumed "
                      "here; resume the lucatrain run's directory, whose newest checkpoint is then used)")  # fmt: skip
