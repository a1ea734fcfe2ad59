"""The `clibd` config section: towers, the pair graph, gathering, and the retrieval evaluation.

Keys of CLIBD's own config and where they live here (`lucatrain/configs/clibd.yaml` mirrors them):

    batch_size 500, epochs 30         train.batch_size, train.num_train_epochs
    lr_config {lr, max_lr}, one_cycle train.learning_rate (= max_lr), train.lr_scheduler (cosine after warmup)
    default_seed 42                   train.seed
    output_dim 768                    clibd.output_dim
    all_gather, loss_setup.{gather_with_grad, local_loss}   clibd.all_gather, clibd.gather_with_grad, clibd.local_loss
    loss_setup.use_horovod            clibd.use_horovod: refused (DeepSpeed is the backend)
    fix_temperature                   clibd.fix_temperature
    amp                               deepspeed.precision (bf16/fp16; logits stay fp32)
    evaluation_period, eval_skip_epoch  train.eval_steps, train.eval_start_step (both in steps)
    ckpt_path, model_output_name      train.trained_checkpoint, train.output_dir
    wandb_project_name                logger.wandb_project (optional wandb; WANDB_MODE=offline works)
    port                              MASTER_PORT of the launcher (run_scripts/common.sh)
    disable_lora                      clibd.lora_towers empty (false: the towers to adapt, run_clibd.sh: all)
    fine_tuning_set {batch_size 150, epochs 15, fine_tune_model_output_dir}
                                      the `clibd_finetune` family (finetune.py), recipe clibd_finetune:
                                      train.batch_size, train.num_train_epochs, train.output_dir
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from lucatrain.config import ConfigError

MODALITIES = ("image", "dna", "text")
IMAGE_ARCHS = ("vit", "resnet", "timm")
LEVELS = ("order", "family", "genus", "species")


@dataclass
class ImageTowerConfig:
    arch: str = "vit"
    """'vit' (a ViT, transformers' ViTModel, [CLS] vector), 'resnet' (transformers' ResNetModel, pooled) or
    'timm' (any timm model, `timm_model`, its pooled pre-logits features; needs timm and torchvision)."""
    pretrained: str = ""
    """Weights to start from, local: for vit/resnet a transformers directory (config.json + weights); for
    timm a weights file (.safetensors, .pth, .bin) or a directory holding model.safetensors or
    pytorch_model.bin (e.g. a Hugging Face snapshot of timm/vit_base_patch16_224.augreg2_in21k_ft_in1k).
    Empty: random init."""
    timm_model: str = "vit_base_patch16_224"
    """The timm architecture with `arch: timm` (CLIBD: vit_base_patch16_224; vit_small_patch16_224,
    resnet50, ...)."""
    timm_kwargs: dict[str, Any] = field(default_factory=dict)
    """Extra `timm.create_model` arguments, e.g. {img_size: 64} for a ViT at another crop."""
    resize: int = 256
    """Shorter side after resizing (CLIBD: 256)."""
    crop: int = 224
    """Square crop the tower sees (CLIBD: 224)."""
    patch_size: int = 16
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    """ViT sizes (vit_base_patch16_224: 16, 768, 12, 12)."""
    resnet_hidden_sizes: list[int] = field(default_factory=lambda: [64, 128, 256, 512])
    resnet_depths: list[int] = field(default_factory=lambda: [2, 2, 2, 2])
    """ResNet stage widths and depths (ResNet-18: [64, 128, 256, 512], [2, 2, 2, 2])."""


@dataclass
class BertTowerConfig:
    pretrained: str = ""
    """A local directory of a transformers BERT (config.json + weights) to start from; empty: random init."""
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12


@dataclass
class ClibdConfig:
    modalities: list[str] = field(default_factory=lambda: list(MODALITIES))
    """The towers to train: image, dna (DNA barcode, BarcodeBERT-style) and/or text (taxonomy)."""
    output_dim: int = 768
    """Every tower projects to this many dimensions, then L2-normalises."""
    bind_to: str = ""
    """Align only the pairs with this modality (ImageBind style); empty: every pair."""
    exclude_pairs: list[list[str]] = field(default_factory=list)
    """Pairs left out, e.g. [[image, text]] (CLIBD's no_image_text_loss)."""
    all_gather: bool = True
    gather_with_grad: bool = True
    local_loss: bool = False
    """open_clip's gathering switches (lucatrain/contrastive.py says which combinations are exact)."""
    use_horovod: bool = False
    """Refused: DeepSpeed is the backend."""
    fix_temperature: bool = False
    """Keep logit_scale at ln(1/0.07) instead of learning it."""
    multi_positive: str = ""
    """A rank (order, family, genus, species) whose shared names make samples positives of each other;
    empty: one positive per sample."""
    image_dir: str = ""
    """With BIOSCAN-5M metadata tables (CSV/TSV/Parquet with processid, dna_barcode, split, the ranks) as
    inputs instead of CLIBD's HDF5: the folder of their images."""
    allow_missing_images: bool = False
    """A specimen without an image (image_mask 0 in the HDF5 file): by default a bad record (CLIBD's
    data has an image for every specimen); true: it trains the pairs it has (DNA-text) and is left out
    of image retrieval."""
    train_group: str = "no_split_and_seen_train"
    """The HDF5 group the training files are read from; a dev split's group is its name (`data.dev_splits`)."""
    key_split: str = "all_keys"
    """The dev split whose embeddings are the retrieval keys; every other dev split is a query split."""
    seen_split: str = "val_seen"
    unseen_split: str = "val_unseen"
    """The query splits whose scores give the seen/unseen harmonic mean (`hm/...`, on the key split)."""
    ks: list[int] = field(default_factory=lambda: [1, 3, 5])
    """Top-k accuracies reported."""
    retrieval: list[str] = field(default_factory=list)
    """Query tower -> key tower combinations scored, as `<query>_to_<key>` (e.g. image_to_dna); empty: every one."""
    levels: list[str] = field(default_factory=lambda: list(LEVELS))
    """Taxonomic levels the retrieval accuracy is reported at."""
    image: ImageTowerConfig = field(default_factory=ImageTowerConfig)
    dna: BertTowerConfig = field(default_factory=BertTowerConfig)
    dna_tower: str = "bert"
    """'bert' (BarcodeBERT-style, over k-mers) or 'lucagplm' (a LucaOne/LucaVirus encoder over single
    nucleotides: fresh from `clibd.dna` sizes, or from `clibd.dna_lucagplm`)."""
    dna_lucagplm: str = ""
    """With dna_tower=lucagplm: a lucatrain export or a LucaOne/LucaVirus checkpoint-step<N>/ to start from."""
    dna_k: int = 4
    """k-mer size of the barcode tokens (non-overlapping)."""
    dna_length: int = 660
    """Barcodes are cut or padded with N to this many nucleotides."""
    text: BertTowerConfig = field(default_factory=lambda: BertTowerConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8))
    """The text tower (CLIBD: bert-small, 4 layers of 512)."""
    text_max_length: int = 20
    """Tokens of the taxonomy text ("order family genus species"), [CLS] included."""
    text_tokenizer: str = ""
    """A local Hugging Face tokenizer directory for the text tower (e.g. bert-small's, as CLIBD uses);
    'sentencepiece': a SentencePiece model trained at start-up on the training split's taxonomy texts
    (`text_vocab_size` pieces at most); empty: a word vocabulary of the training split's taxonomy names."""
    text_vocab_size: int = 1000
    """The SentencePiece model's vocabulary size (at most; fewer when the texts hold fewer pieces)."""
    lora_towers: list[str] = field(default_factory=list)
    """Towers trained through LoRA adapters (peft; rank, alpha and dropout from the `lora` section), their
    base weights frozen; the projections train in full. Empty: every tower trains in full (CLIBD's
    disable_lora). ViT and BERT towers only."""
    lora_target_modules: list[str] = field(default_factory=lambda: ["query", "value"])
    """The attention projections that get adapters (transformers' ViT/BERT names: query, key, value, dense)."""
    qlora: bool = False
    """QLoRA: the `lora_towers`' encoders hold their frozen base weights in 4-bit NF4 with double
    quantization (bitsandbytes), the adapters and projections train in bf16/fp32. Needs a CUDA GPU
    and ZeRO-0/1/2 (ZeRO-3 cannot partition packed 4-bit weights)."""
    qlora_on_cpu: bool = False
    """Allow QLoRA without a GPU through bitsandbytes' CPU reference kernels (slow: for tests and
    trying a config, not for training)."""
    grad_cache: bool = False
    """GradCache: the whole optimizer step (`train.batch_size` x `train.gradient_accumulation_steps` x
    processes) is one contrastive batch, embedded and backpropagated one micro-batch at a time, so only
    the embeddings of the whole batch are held at once. Off: each micro-batch is its own contrastive batch."""
    dropout: float = 0.1
    """Hidden and attention dropout of every transformer tower (BERT's 0.1); ResNet has none."""

    def validate(self) -> None:
        if self.use_horovod:
            raise ConfigError("`clibd.use_horovod`: not supported, DeepSpeed is the backend (set it to false)")
        if not self.modalities or len(set(self.modalities)) != len(self.modalities):
            raise ConfigError(f"`clibd.modalities` must list distinct towers of {list(MODALITIES)}, got {self.modalities}")
        for m in self.modalities:
            if m not in MODALITIES:
                raise ConfigError(f"`clibd.modalities`: unknown tower {m!r}; choose from {list(MODALITIES)}")
        if len(self.modalities) < 2:
            raise ConfigError("`clibd.modalities`: a contrastive run needs at least two towers")
        if self.bind_to and self.bind_to not in self.modalities:
            raise ConfigError(f"`clibd.bind_to` must be one of `clibd.modalities` {self.modalities}, got {self.bind_to!r}")
        for pair in self.exclude_pairs:
            if len(pair) != 2 or any(m not in self.modalities for m in pair):
                raise ConfigError(f"`clibd.exclude_pairs`: {pair} is not a pair of `clibd.modalities` {self.modalities}")
        if self.multi_positive and self.multi_positive not in LEVELS:
            raise ConfigError(f"`clibd.multi_positive` must be empty or one of {list(LEVELS)}, got {self.multi_positive!r}")
        for level in self.levels:
            if level not in LEVELS:
                raise ConfigError(f"`clibd.levels`: unknown level {level!r}; choose from {list(LEVELS)}")
        for name in self.retrieval:
            query, _, key = name.partition("_to_")
            if query not in self.modalities or key not in self.modalities:
                raise ConfigError(f"`clibd.retrieval`: {name!r} is not <query>_to_<key> of `clibd.modalities` {self.modalities}")
        if not self.ks or any(k < 1 for k in self.ks):
            raise ConfigError(f"`clibd.ks` must list integers >= 1, got {self.ks}")
        if self.image.arch not in IMAGE_ARCHS:
            raise ConfigError(f"`clibd.image.arch` must be one of {list(IMAGE_ARCHS)}, got {self.image.arch!r}")
        if not 0 < self.image.crop <= self.image.resize:
            raise ConfigError(f"`clibd.image.crop` ({self.image.crop}) must be > 0 and <= `clibd.image.resize` ({self.image.resize})")
        if self.image.arch == "vit" and self.image.crop % self.image.patch_size:
            raise ConfigError(f"`clibd.image.crop` ({self.image.crop}) must be a multiple of `clibd.image.patch_size` ({self.image.patch_size})")
        for name, tower in (("image", self.image), ("dna", self.dna), ("text", self.text)):
            if tower.hidden_size % tower.num_attention_heads:
                raise ConfigError(f"`clibd.{name}.hidden_size` ({tower.hidden_size}) must be a multiple of "
                                  f"`clibd.{name}.num_attention_heads` ({tower.num_attention_heads})")  # fmt: skip
        if self.dna_tower not in ("bert", "lucagplm"):
            raise ConfigError(f"`clibd.dna_tower` must be 'bert' or 'lucagplm', got {self.dna_tower!r}")
        if self.dna_lucagplm and self.dna_tower != "lucagplm":
            raise ConfigError("`clibd.dna_lucagplm` is the encoder of `clibd.dna_tower=lucagplm`; set that too")
        if not 1 <= self.dna_k <= 8:
            raise ConfigError(f"`clibd.dna_k` must be in 1..8 (the vocabulary has 4^k k-mers), got {self.dna_k}")
        if self.dna_length < self.dna_k:
            raise ConfigError(f"`clibd.dna_length` ({self.dna_length}) must be >= `clibd.dna_k` ({self.dna_k})")
        for tower in self.lora_towers:
            if tower not in self.modalities:
                raise ConfigError(f"`clibd.lora_towers`: {tower!r} is not one of `clibd.modalities` {self.modalities}")
        if "image" in self.lora_towers and self.image.arch == "resnet":
            raise ConfigError("`clibd.lora_towers`: LoRA on the image tower needs a ViT (`clibd.image.arch` vit, or timm with a "
                              "ViT and its module names in `clibd.lora_target_modules`, e.g. qkv); ResNet has no attention projections")  # fmt: skip
        if self.qlora and not self.lora_towers:
            raise ConfigError("`clibd.qlora`: QLoRA quantizes the towers that train through LoRA adapters; "
                              "name them in `clibd.lora_towers` (e.g. [image, dna, text])")  # fmt: skip
        if self.text_vocab_size < 8:
            raise ConfigError(f"`clibd.text_vocab_size` must be >= 8, got {self.text_vocab_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"`clibd.dropout` must be in [0, 1), got {self.dropout}")
        if self.output_dim < 1 or self.text_max_length < 2:
            raise ConfigError("`clibd.output_dim` must be >= 1 and `clibd.text_max_length` >= 2")
