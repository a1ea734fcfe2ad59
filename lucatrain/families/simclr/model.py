"""SimCLR's model: a backbone (what gets exported) and the projection head the loss sees.

    features   = backbone(view)                      (B, F)   pooled; ResNet: global average, ViT: [CLS]
    projection = Linear(F, hidden) -> ReLU -> Linear(hidden, out), L2-normalised

Backbones by name (`simclr.backbone`), `in_chans` from the data (multispectral stacks train as they are):
    resnet18 / resnet50 / resnet101   transformers' ResNetModel at those depths and widths
    vit_base_patch16_224              transformers' ViTModel (patch 16, 768 x 12 layers x 12 heads)
    resnet_tiny / vit_tiny            small versions for CPU runs and tests
    anything else                     a timm model of that name (needs timm and torchvision)
ResNet's batch norm uses each process's own batch statistics (as PyTorch DDP without SyncBatchNorm):
with a ResNet, 1 x B and 2 x B/2 train slightly different models; ViT backbones (layer norm) do not.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

RESNETS = {
    "resnet18": dict(depths=[2, 2, 2, 2], hidden_sizes=[64, 128, 256, 512], layer_type="basic", embedding_size=64),
    "resnet50": dict(depths=[3, 4, 6, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", embedding_size=64),
    "resnet101": dict(depths=[3, 4, 23, 3], hidden_sizes=[256, 512, 1024, 2048], layer_type="bottleneck", embedding_size=64),
    "resnet_tiny": dict(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 64, 64], layer_type="basic", embedding_size=16),
}
VITS = {
    "vit_base_patch16_224": dict(patch_size=16, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "vit_tiny": dict(patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
}


class Backbone(nn.Module):
    """An image encoder giving (B, features) pooled features; `kind` says whose model it is."""

    def __init__(self, name: str, in_chans: int, image_size: int, weights: str = "", library: str = "transformers"):
        super().__init__()
        self.name, self.kind = name, "transformers"
        if library == "timm":
            self.kind = "timm"
            self.model = _timm_model(name, in_chans, weights)
            self.num_features = self.model.num_features
        elif name in RESNETS:
            from transformers import ResNetConfig, ResNetModel

            if weights:
                self.model = ResNetModel.from_pretrained(weights, num_channels=in_chans)
            else:
                self.model = ResNetModel(ResNetConfig(num_channels=in_chans, **RESNETS[name]))
            self.num_features = self.model.config.hidden_sizes[-1]
        elif name in VITS:
            from transformers import ViTConfig, ViTModel

            if weights:
                self.model = ViTModel.from_pretrained(weights, num_channels=in_chans, add_pooling_layer=False)
            else:
                self.model = ViTModel(ViTConfig(image_size=image_size, num_channels=in_chans, **VITS[name]), add_pooling_layer=False)
            self.num_features = self.model.config.hidden_size
        else:
            self.kind = "timm"
            self.model = _timm_model(name, in_chans, weights)
            self.num_features = self.model.num_features

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.kind == "timm":
            return self.model(pixels)
        if self.name in RESNETS:
            return self.model(pixel_values=pixels).pooler_output.flatten(1)
        return self.model(pixel_values=pixels, interpolate_pos_encoding=True).last_hidden_state[:, 0]


def _timm_model(name: str, in_chans: int, weights: str) -> nn.Module:
    try:
        import timm
    except ImportError as err:
        raise ValueError(f"`simclr.backbone={name}` is not one of the built-in backbones {sorted({**RESNETS, **VITS})}, so it is "
                         f"taken as a timm model, and timm does not import here ({err})") from None  # fmt: skip
    if not weights:
        return timm.create_model(name, pretrained=False, num_classes=0, in_chans=in_chans)
    path = Path(weights)
    if path.is_dir():
        found = [path / n for n in ("model.safetensors", "pytorch_model.bin") if (path / n).is_file()]
        if not found:
            raise ValueError(f"`simclr.weights={path}`: no model.safetensors or pytorch_model.bin in the directory")
        path = found[0]
    if not path.is_file():
        raise ValueError(f"`simclr.weights={path}`: no such weights file")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, num_classes=0, in_chans=in_chans)


class ProjectionHead(nn.Module):
    def __init__(self, features: int, hidden: int, out: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(features, hidden), nn.ReLU(), nn.Linear(hidden, out))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.layers(features), dim=-1)
