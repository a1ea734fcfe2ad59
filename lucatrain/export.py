"""Exports for downstream use: the encoder as a transformers-loadable directory, optionally the heads.

    <dir>/config.json           LucaGPLMConfig, with `auto_map` for trust_remote_code
    <dir>/model.safetensors     encoder weights under LucaOne's names (the tied LM weight stored once)
    <dir>/modeling_lucagplm.py  the model code: `AutoModel.from_pretrained(dir, trust_remote_code=True)`
                                works without lucatrain installed
    <dir>/heads.safetensors     with heads: `<task>.hidden_layer.weight`, `<task>.classifier.bias`, ...
    <dir>/heads.json            with heads: per task its level, output mode, sizes, loss weight, label names

The gene/protein families write `best/` and `last/` this way (heads included) from the live engine;
`lucatrain export` asks the checkpoint's family to do the same offline from any committed checkpoint, rebuilding full fp32 weights from the
DeepSpeed shards with DeepSpeed's own ZeRO consolidation (any stage, any world size, no GPU).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from lucatrain.checkpoint import EXPORT_INFO
from lucatrain.engine import PARAM_GROUP_NAMES
from lucatrain.models.lora import merge_lora_state_dict
from lucatrain.models.lucagplm import CONFIG_NAME, TIED_KEY, WEIGHTS_NAME, LucaGPLMConfig

MODELING_FILE = "modeling_lucagplm.py"
HEADS_WEIGHTS = "heads.safetensors"
HEADS_CONFIG = "heads.json"
ENCODER_PREFIX, HEADS_PREFIX = "model.", "heads."  # parameter names inside the Task module


def modeling_source() -> str:
    """lucagplm.py and the transformers wrapper (hf.py) as one self-contained module."""
    models = Path(__file__).with_name("models")
    core = (models / "lucagplm.py").read_text(encoding="utf-8")
    wrapper = (models / "hf.py").read_text(encoding="utf-8")
    # The wrapper's own imports of lucatrain and its Auto registration do not belong in remote code;
    # `from __future__` may only open a module, and the core file already has it.
    wrapper = wrapper[: wrapper.index("AutoConfig.register(")]
    kept = [line for line in wrapper.splitlines()
            if not line.startswith(("from lucatrain", "from __future__"))]  # fmt: skip
    return core + "\n\n# ---- transformers wrapper (lucatrain/models/hf.py) ----\n" + "\n".join(kept).rstrip() + "\n"


def write_export(directory, encoder_config: LucaGPLMConfig, encoder_state: dict[str, torch.Tensor],
                 heads_state: dict[str, torch.Tensor] | None = None, heads_info: dict | None = None) -> Path:  # fmt: skip
    """Write an export directory (module docstring). `encoder_state` uses LucaGPLM's names."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = encoder_config.to_dict()
    config["gradient_checkpointing"] = False  # a training-time choice, not part of the model
    config["auto_map"] = {"AutoConfig": "modeling_lucagplm.LucaGPLMConfig", "AutoModel": "modeling_lucagplm.LucaGPLMModel"}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tensors = {k: v.detach().float().cpu().contiguous() for k, v in encoder_state.items() if k != TIED_KEY}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / MODELING_FILE).write_text(modeling_source(), encoding="utf-8")
    if heads_state:
        save_file({k: v.detach().float().cpu().contiguous() for k, v in heads_state.items()},
                  str(directory / HEADS_WEIGHTS), metadata={"format": "pt"})  # fmt: skip
        (directory / HEADS_CONFIG).write_text(json.dumps(heads_info or {}, indent=1) + "\n", encoding="utf-8")
    return directory


def split_task_state(state: dict[str, torch.Tensor], lora: dict | None = None):
    """A Task module's state dict -> (encoder state, heads state), LoRA adapters merged in."""
    encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    heads = {k[len(HEADS_PREFIX):]: v for k, v in state.items() if k.startswith(HEADS_PREFIX)}
    if lora and lora.get("enabled"):
        encoder = merge_lora_state_dict(encoder, lora["r"], lora["alpha"])
    return encoder, heads


def checkpoint_state_dict(checkpoint_dir, tag: str = "ds") -> dict[str, torch.Tensor]:
    """Full fp32 weights of the Task module from a committed checkpoint's DeepSpeed files."""
    checkpoint_dir = Path(checkpoint_dir)
    # ZeRO-3 writes one zero_pp_rank_<r>_mp_rank_00_model_states.pt per rank, other stages one file.
    found = sorted((checkpoint_dir / tag).glob("*mp_rank_00_model_states.pt"))
    if not found:
        raise FileNotFoundError(f"no DeepSpeed model states in {checkpoint_dir / tag}: not a complete lucatrain checkpoint")
    states = found[0]
    # DeepSpeed's own file, written by this run (it pickles its config and counters beside the tensors).
    model_states = torch.load(states, map_location="cpu", weights_only=False)
    stage = (model_states.get("ds_config") or {}).get("zero_optimization", {}).get("stage", 0)
    if stage == 0:  # no ZeRO partitioning: the module's weights are stored whole
        state = {k: v.float() for k, v in model_states["module"].items()}
        # In bf16/fp16 the module holds rounded weights; DeepSpeed's unfused optimizer saved the fp32
        # masters per parameter group, in the order `Engine.param_group_names` recorded.
        optimizer = model_states.get("optimizer") or {}
        for names, masters in zip(model_states.get(PARAM_GROUP_NAMES) or [], optimizer.get("fp32_groups") or []):
            for name, master in zip(names, masters):
                state[name] = master.detach().float().reshape(state[name].shape).clone()
        return state
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag)


def export_checkpoint(checkpoint_dir, out_dir, with_heads: bool = False, tag: str = "ds") -> Path:
    """`lucatrain export`: a committed checkpoint -> the export its model family writes."""
    from lucatrain.families import get_family

    checkpoint_dir = Path(checkpoint_dir)
    info_path = checkpoint_dir / EXPORT_INFO
    if not info_path.is_file():
        raise FileNotFoundError(f"{info_path} not found: the checkpoint was not written by this lucatrain version")
    info = json.loads(info_path.read_text(encoding="utf-8"))
    family = get_family(info.get("family", "lucaone_gplm"))  # checkpoints before families were LucaOne's
    family.export(Path(out_dir), checkpoint_state_dict(checkpoint_dir, tag), info, with_heads=with_heads)
    return Path(out_dir)


def export_lucaone_checkpoint(checkpoint_dir, out_dir) -> Path:
    """A LucaOne/LucaVirus `checkpoint-step<N>/` -> an export of its encoder (transformers-loadable)."""
    from lucatrain.models.lucaone_checkpoint import model_from_lucaone_checkpoint

    model, _ = model_from_lucaone_checkpoint(checkpoint_dir)
    return write_export(out_dir, model.config, model.state_dict())
