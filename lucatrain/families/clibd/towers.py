"""The towers: an encoder per modality, pooled, projected to `output_dim` and L2-normalised.

    image  transformers ViTModel ([CLS] vector) or ResNetModel (pooled), from config or a local directory
    dna    transformers BertModel over BarcodeBERT-order k-mer tokens, mean over the real k-mers only
           (CLIBD's mean includes the padding); or LucaOne's encoder (LucaGPLM) over single
           nucleotides, fresh or from an export / a LucaOne checkpoint (`clibd.dna_tower=lucagplm`)
    text   transformers BertModel over the taxonomy words, mean over the real tokens

The image towers are transformers' ViT and ResNet (weights from a local directory with
`from_pretrained`) or, with `clibd.image.arch=timm`, any timm model (weights from a local file). timm
needs torchvision, whose wheels for this project's CPU torch do not import on the CPU machines it is
tested on, so timm is optional (`pip install -e ".[timm]"` where torchvision matches the torch).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lucatrain.data.barcode import pad_id, vocab_size
from lucatrain.families.clibd.data import PAD


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, L, H), (B, L) -> (B, H): the mean over positions where `mask` is 1."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)


class Tower(nn.Module):
    """encoder -> pooled features -> Linear(output_dim, no bias) -> L2 normalisation."""

    def __init__(self, encoder: nn.Module, width: int, output_dim: int):
        super().__init__()
        self.encoder = encoder
        self.proj = nn.Linear(width, output_dim, bias=False)

    def features(self, batch: dict) -> torch.Tensor:
        """(B, width) pooled encoder features of this tower's inputs in `batch` (each tower has its own)."""
        raise NotImplementedError(f"{type(self).__name__} must implement features(batch)")

    def forward(self, batch: dict) -> torch.Tensor:
        return F.normalize(self.proj(self.features(batch)), dim=-1)


class ImageTower(Tower):
    def __init__(self, cfg, output_dim: int, dropout: float):
        from transformers import ResNetConfig, ResNetModel, ViTConfig, ViTModel

        if cfg.arch == "timm":
            encoder = timm_encoder(cfg, dropout)
            super().__init__(encoder, encoder.num_features, output_dim)
            self.arch = cfg.arch
            return
        if cfg.arch == "vit":
            rates = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
            if cfg.pretrained:
                encoder = ViTModel.from_pretrained(cfg.pretrained, add_pooling_layer=False, **rates)
            else:
                encoder = ViTModel(ViTConfig(image_size=cfg.crop, patch_size=cfg.patch_size, hidden_size=cfg.hidden_size,
                                             num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
                                             intermediate_size=4 * cfg.hidden_size, **rates), add_pooling_layer=False)  # fmt: skip
            width = encoder.config.hidden_size
        else:
            if cfg.pretrained:
                encoder = ResNetModel.from_pretrained(cfg.pretrained)
            else:
                encoder = ResNetModel(ResNetConfig(hidden_sizes=cfg.resnet_hidden_sizes, depths=cfg.resnet_depths, layer_type="basic",
                                                   embedding_size=cfg.resnet_hidden_sizes[0]))  # fmt: skip
            width = encoder.config.hidden_sizes[-1]
        super().__init__(encoder, width, output_dim)
        self.arch = cfg.arch

    def features(self, batch: dict) -> torch.Tensor:
        pixels = batch["image"].to(self.proj.weight.dtype)
        if self.arch == "timm":  # num_classes=0: the pooled pre-logits features
            return self.encoder(pixels)
        if self.arch == "vit":
            return self.encoder(pixel_values=pixels).last_hidden_state[:, 0]
        return self.encoder(pixel_values=pixels).pooler_output.flatten(1)


def timm_encoder(cfg, dropout: float) -> nn.Module:
    """`cfg.timm_model` without its classifier (num_classes=0), random or from the local `cfg.pretrained`."""
    from pathlib import Path

    try:
        import timm
    except ImportError as err:
        raise ValueError(f"`clibd.image.arch=timm` needs timm and a torchvision that matches this torch ({err}); "
                         "`pip install timm torchvision`, or use arch vit / resnet (transformers)") from None  # fmt: skip
    kwargs = {"num_classes": 0, "drop_rate": dropout, **cfg.timm_kwargs}
    if not cfg.pretrained:
        return timm.create_model(cfg.timm_model, pretrained=False, **kwargs)
    path = Path(cfg.pretrained)
    if path.is_dir():
        found = [path / name for name in ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors") if (path / name).is_file()]
        if not found:
            raise ValueError(f"`clibd.image.pretrained={path}`: no model.safetensors or pytorch_model.bin in the directory")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"`clibd.image.pretrained={path}`: no such weights file")
    # timm's own loader, pointed at the local file: it drops the classifier and adapts what it knows how to.
    return timm.create_model(cfg.timm_model, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)


class BertTower(Tower):
    """A BERT over `<prefix>_input_ids` / `<prefix>_attention_mask`, mean-pooled over real tokens."""

    def __init__(self, cfg, prefix: str, vocab: int, positions: int, pad: int, output_dim: int, dropout: float):
        from transformers import BertConfig, BertModel

        rates = {"hidden_dropout_prob": dropout, "attention_probs_dropout_prob": dropout}
        if cfg.pretrained:
            encoder = BertModel.from_pretrained(cfg.pretrained, add_pooling_layer=False, **rates)
        else:
            encoder = BertModel(BertConfig(vocab_size=vocab, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_hidden_layers,
                                           num_attention_heads=cfg.num_attention_heads, intermediate_size=4 * cfg.hidden_size,
                                           max_position_embeddings=positions, pad_token_id=pad, **rates), add_pooling_layer=False)  # fmt: skip
        super().__init__(encoder, encoder.config.hidden_size, output_dim)
        self.prefix = prefix

    def features(self, batch: dict) -> torch.Tensor:
        ids, mask = batch[f"{self.prefix}_input_ids"], batch[f"{self.prefix}_attention_mask"]
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        return masked_mean(hidden, mask)


class LucaTower(Tower):
    """A LucaGPLM (LucaOne's encoder) over the barcode's nucleotides, mean over residues (no CLS/SEP)."""

    def features(self, batch: dict) -> torch.Tensor:
        from lucatrain.embed import pool

        mask = batch["dna_attention_mask"]
        hidden = self.encoder(batch["dna_input_ids"], batch["dna_token_type_ids"], mask)
        return pool(hidden, mask, "mean")


def lucagplm_encoder(cfg, recorded: dict | None = None):
    """The LucaGPLM of the DNA tower: as an export recorded it (`recorded`: its config), from
    `clibd.dna_lucagplm`, or fresh from the `clibd.dna` sizes; dropout is this run's."""
    from lucatrain.models.encoder import load_encoder
    from lucatrain.models.lucagplm import LucaGPLM, LucaGPLMConfig

    c = cfg.clibd
    rates = {"hidden_dropout_prob": c.dropout, "attention_probs_dropout_prob": c.dropout}
    if recorded is not None:
        return LucaGPLM(LucaGPLMConfig(**{**recorded, **rates}))
    if c.dna_lucagplm:
        loaded, _ = load_encoder(c.dna_lucagplm)
        encoder = LucaGPLM(LucaGPLMConfig(**{**loaded.config.to_dict(), **rates}))
        encoder.load_state_dict(loaded.state_dict())
        return encoder
    return LucaGPLM(LucaGPLMConfig(hidden_size=c.dna.hidden_size, num_hidden_layers=c.dna.num_hidden_layers,
                                   num_attention_heads=c.dna.num_attention_heads, max_position_embeddings=max(1024, c.dna_length + 2),
                                   **rates))  # fmt: skip


def build_towers(cfg, text_vocab_size: int, lucagplm_config: dict | None = None, text_pad: int = PAD) -> nn.ModuleDict:
    """The towers `cfg.clibd.modalities` names, sized from the config (`lucagplm_config`: the DNA
    encoder's config as an export recorded it)."""
    c = cfg.clibd
    towers = {}
    for modality in c.modalities:
        if modality == "image":
            towers[modality] = ImageTower(c.image, c.output_dim, c.dropout)
        elif modality == "dna" and c.dna_tower == "lucagplm":
            encoder = lucagplm_encoder(cfg, lucagplm_config)
            towers[modality] = LucaTower(encoder, encoder.config.hidden_size, c.output_dim)
        elif modality == "dna":
            towers[modality] = BertTower(c.dna, "dna", vocab_size(c.dna_k), 1 + c.dna_length // c.dna_k, pad_id(c.dna_k), c.output_dim,
                                         c.dropout)  # fmt: skip
        else:
            towers[modality] = BertTower(c.text, "text", text_vocab_size, c.text_max_length, text_pad, c.output_dim, c.dropout)
    return nn.ModuleDict(towers)
