"""The `simclr` config section, and where the keys of the Phenoscape SimCLR config live.

    Phenoscape key                 lucatrain
    data_dir                       data.train_files: [DIR]  (dev splits: data.dev_splits)
    out_dir                        train.output_dir
    backbone                       simclr.backbone (resnet18/50/101, vit_base_patch16_224; small: resnet_tiny, vit_tiny)
    weights                        simclr.weights: "" (null: random) or a local file/dir; DEFAULT is refused (a download)
    input_size                     simclr.transforms.input_size
    lr, batch_size, max_epochs     train.learning_rate, train.batch_size (per process), train.num_train_epochs
    temperature                    simclr.temperature
    seed, deterministic            train.seed (views and order are always a function of the seed)
    accelerator, devices, strategy the launcher (deepspeed / torchrun, nproc_per_node) and deepspeed.config
    num_workers                    data.num_workers (pin_memory, persistent_workers: the loader's own choice)
    log_every_n_steps              train.loss_logging_steps
    precision 16                   deepspeed.precision: fp16 (bf16 on hardware that has it; 32: fp32)
    accumulate_grad_batches        train.gradient_accumulation_steps
    lr_scheduler cosine, T_max, eta_min   train.lr_scheduler: cosine, train.schedule_steps (T_max in steps;
                                   0: the run's last step), train.lr2 (eta_min)
    early_stopping {monitor, patience, min_delta}   train.early_stopping (monitor val_loss -> val/loss)
    transforms {...}               simclr.transforms (same names)
    --resume .../last.ckpt         train.trained_checkpoint (latest, a step, or a checkpoint directory)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lucatrain.config import ConfigError

BACKBONES = ("resnet18", "resnet50", "resnet101", "vit_base_patch16_224", "resnet_tiny", "vit_tiny")


@dataclass
class TransformsConfig:
    """SimCLRTransform's parameters (lucatrain/data/simclr_views.py)."""

    input_size: int = 224
    cj_prob: float = 0.8
    cj_strength: float = 0.5
    min_scale: float = 0.08
    random_gray_scale: float = 0.2
    gaussian_blur: float = 0.5
    kernel_size: float = 0.1
    """The blur kernel as a fraction of input_size (made odd, at least 3)."""
    sigmas: list[float] = field(default_factory=lambda: [0.1, 2.0])
    hflip: float = 0.5
    vflip: float = 0.0
    normalize: bool = True
    """ImageNet mean/std for 3-channel images (other channel counts are left in [0, 1])."""


@dataclass
class SimclrConfig:
    backbone: str = "resnet18"
    """resnet18, resnet50, resnet101, vit_base_patch16_224 (transformers' models of those sizes), or
    resnet_tiny / vit_tiny for CPU runs; any other name is a timm model (needs timm and torchvision)."""
    backbone_library: str = "transformers"
    """Whose model `backbone` names: 'transformers' (the built-in names, timm for any other) or 'timm'
    (every name through timm.create_model, e.g. to start from a timm weights file of resnet50; needs
    timm and a torchvision built for this torch)."""
    weights: str = ""
    """"" (Phenoscape's null): random init; a local weights file or directory (a transformers directory
    for the built-in backbones, a file for timm). DEFAULT (pretrained weights) needs a download and is refused."""
    temperature: float = 0.1
    proj_hidden_dim: int = 2048
    proj_output_dim: int = 128
    """The projection head: Linear(features, hidden) -> ReLU -> Linear(hidden, output)."""
    transforms: TransformsConfig = field(default_factory=TransformsConfig)
    knn_bank: str = ""
    """The labelled dev split whose backbone features are the kNN classifier's memory (e.g. `bank`);
    the other labelled dev splits are scored against it. Empty: no kNN accuracy."""
    linear_probe: bool = False
    """Also report `probe_top1`: a linear classifier (softmax regression, L-BFGS, zero init) fitted on the
    bank's frozen backbone features and labels at every evaluation, scored on the other labelled splits."""
    log_views_steps: int = 500
    """Every N optimizer steps (and at the start): the two augmented views of 4 training images as an
    image grid in TensorBoard (`views`), to see what the augmentation does; 0: never."""
    knn_k: int = 20
    knn_temperature: float = 0.1
    """Weighted kNN (Wu et al. 2018): each of the k nearest bank images votes exp(cosine / T) for its label."""

    def validate(self) -> None:
        if self.weights.upper() == "DEFAULT":
            raise ConfigError("`simclr.weights=DEFAULT` means downloading pretrained weights, and this machine cannot; "
                              "download them elsewhere and give the local file or directory, or leave it empty for random init")  # fmt: skip
        if self.backbone_library not in ("transformers", "timm"):
            raise ConfigError(f"`simclr.backbone_library` must be transformers or timm, got {self.backbone_library!r}")
        if self.temperature <= 0:
            raise ConfigError(f"`simclr.temperature` must be > 0, got {self.temperature}")
        t = self.transforms
        if t.input_size < 8:
            raise ConfigError(f"`simclr.transforms.input_size` must be at least 8, got {t.input_size}")
        if not 0 < t.min_scale <= 1:
            raise ConfigError(f"`simclr.transforms.min_scale` must be in (0, 1], got {t.min_scale}")
        if len(t.sigmas) != 2 or not 0 < t.sigmas[0] <= t.sigmas[1]:
            raise ConfigError(f"`simclr.transforms.sigmas` must be [low, high] with 0 < low <= high, got {t.sigmas}")
        for name in ("cj_prob", "random_gray_scale", "gaussian_blur", "hflip", "vflip"):
            if not 0 <= getattr(t, name) <= 1:
                raise ConfigError(f"`simclr.transforms.{name}` is a probability, got {getattr(t, name)}")
        if self.knn_k < 1:
            raise ConfigError(f"`simclr.knn_k` must be >= 1, got {self.knn_k}")
