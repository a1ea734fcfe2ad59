"""LoRA adapters (through peft) on the encoder, and merging them back for export; QLoRA's 4-bit base.

With `lora.enabled`, the base weights are frozen and only the low-rank adapters train; the
exported `last/`/`best/` models hold merged weights W + (alpha / r) * B @ A, so they load as a
plain LucaGPLM with no peft needed downstream.

QLoRA (`quantize_linears`, before the adapters go in): every nn.Linear of a module becomes
bitsandbytes' 4-bit NF4 Linear with double quantization (QLoRA's choices), frozen; peft puts its
adapters on those layers. An export dequantizes the base (`Engine.full_state_dict`), so the merged
weights are dequant(NF4(W)) + (alpha / r) * B @ A: the model that was trained, in plain float.
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


def quantize_linears(model: nn.Module, compute_dtype: torch.dtype) -> int:
    """Replace every nn.Linear of `model` by a frozen bitsandbytes NF4 Linear4bit holding its weights
    (quantized now, on the layer's device); returns how many were replaced."""
    import bitsandbytes as bnb

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not nn.Linear:
                continue
            quantized = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                          compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4")  # fmt: skip
            quantized.weight = bnb.nn.Params4bit(child.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4")
            if child.bias is not None:
                quantized.bias = nn.Parameter(child.bias.data.clone(), requires_grad=False)
            quantized = quantized.to(child.weight.device)  # bitsandbytes quantizes on the move
            # On CPUs with AVX512-BF16, bitsandbytes repacks the weight in place at the first evaluation
            # forward (another layout and quantization state, and it fails for widths below its block):
            # keep the one layout that training, checkpoints and the export agree on.
            quantized.support_avx512bf16_for_cpu = False
            quantized._register_load_state_dict_pre_hook(_check_quant_state, with_module=True)
            setattr(parent, name, quantized)
            replaced += 1
    return replaced


def _check_quant_state(module, state_dict, prefix, *args) -> None:
    """A checkpoint's state dict holds each 4-bit weight's quantization state under extra keys
    (`weight.absmax`, ...), which torch's strict load would reject. The base is frozen and rebuilt
    the same way at every start, so the saved state must equal this one: checked, then left out."""
    current = module.weight.quant_state.as_dict(packed=True)
    for key in [k for k in state_dict if k.startswith(prefix + "weight.")]:
        saved = state_dict.pop(key)
        mine = current.get(key[len(prefix + "weight.") :])
        if mine is None or not torch.equal(saved.cpu(), mine.cpu()):
            raise ValueError(f"{prefix}weight: the checkpoint's 4-bit base weights differ from this run's (quantization "
                             f"state {key!r}); resume with the same base model and seed")  # fmt: skip


def dequantized(param: torch.Tensor) -> torch.Tensor | None:
    """The float weight a bitsandbytes 4-bit parameter stands for; None for any other tensor."""
    quant_state = getattr(param, "quant_state", None)
    if quant_state is None:
        return None
    import bitsandbytes as bnb

    return bnb.functional.dequantize_4bit(param.data, quant_state)
