"""LoRA adapters (through peft) on the encoder, and merging them back for export.

With `lora.enabled`, the base weights are frozen and only the low-rank adapters train; the
exported `last/`/`best/` models hold merged weights W + (alpha / r) * B @ A, so they load as a
plain LucaGPLM with no peft needed downstream.
"""

from __future__ import annotations

import torch
from torch import nn

ADAPTER = "default"  # peft's adapter name


def apply_lora(model: nn.Module, r: int, alpha: int, dropout: float, target_modules: list[str]) -> nn.Module:
    """Inject adapters into the modules named `target_modules` (e.g. q_proj) and freeze the rest."""
    from peft import LoraConfig, inject_adapter_in_model

    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in names]
    if missing:
        raise ValueError(f"`lora.target_modules`: no module named {missing} in the model; e.g. q_proj, k_proj, v_proj, out_proj, fc1, fc2")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(target_modules))
    return inject_adapter_in_model(config, model, adapter_name=ADAPTER)


def lora_settings(cfg) -> dict:
    """The LoRA settings an export needs to merge the adapters (`merge_lora_state_dict`)."""
    lora = cfg.lora
    return {"enabled": lora.enabled, "r": lora.r, "alpha": lora.alpha}


def merge_lora_state_dict(state: dict[str, torch.Tensor], r: int, alpha: int) -> dict[str, torch.Tensor]:
    """A peft-injected state dict -> the plain model's state dict with adapters folded in."""
    scale = alpha / r
    merged = {}
    for key, value in state.items():
        if f".lora_A.{ADAPTER}." in key or f".lora_B.{ADAPTER}." in key:
            continue
        if ".base_layer." in key:
            prefix, param = key.split(".base_layer.")
            if param == "weight":
                a = state[f"{prefix}.lora_A.{ADAPTER}.weight"]  # (r, in)
                b = state[f"{prefix}.lora_B.{ADAPTER}.weight"]  # (out, r)
                value = value + scale * (b @ a)
            key = f"{prefix}.{param}"
        merged[key] = value
    return merged
