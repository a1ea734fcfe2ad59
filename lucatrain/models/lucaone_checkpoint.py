"""Initialise a `LucaGPLM` from a checkpoint saved by LucaOne / LucaVirus's own training code.

Such a checkpoint is a directory (`checkpoint-step<N>/`) holding `config.json` (LucaOne's config keys)
and `pytorch.pth` (the state dict, possibly saved from a DDP-wrapped module, so every key may start
with `module.`); see LUCAONE_FORMAT.md. Only `pytorch.pth` is read, with `weights_only=True`: the
pickled whole module (`pytorch.pt`), `training_args.bin` and the optimizer state are never touched.

The encoder's parameter names already equal LucaOne's, so loading is a name-and-shape match plus
bookkeeping, collected in a `LoadReport`:

- encoder keys with the model's shape are loaded; `lm_head.weight` is the same Parameter as
  `embed_tokens.weight` and is loaded once;
- LucaOne's pretraining task heads (`hidden_layer_list.<i>.*`, `classifier_list.<i>.*`; head i is
  the i-th label task of that run, see `lucaone_head_tasks`) are kept aside in the report and loaded
  into the new run's heads by `load_lucaone_heads` when the task and every shape match; any other
  head is skipped with the reason;
- keys that are not part of the encoder nor a head are skipped and reported;
- encoder keys absent from the checkpoint keep their initial values and are reported as missing;
- a shape mismatch is an error, except a checkpoint with MORE layers than the model when
  `first_n_layers=True`: the model then takes the checkpoint's first N layers (as LucaVirus was
  initialised from LucaOne) and the remaining layers are reported as unused.
"""

from __future__ import annotations

import inspect
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lucatrain.models.lucagplm import ROPE_BASE, TIED_KEY, LucaGPLM, LucaGPLMConfig

CONFIG_NAME = "config.json"
STATE_DICT_NAME = "pytorch.pth"
DDP_PREFIX = "module."
EMBED_KEY = "embed_tokens.weight"
HEAD_MARKERS = ("classifier", "hidden_layer", "output")  # name parts of LucaOne's task-head modules
# LucaOne keeps its heads in flat ModuleLists: hidden_layer_list.<i> (C x H) and classifier_list.<i> (K x C).
_HEAD_KEY = re.compile(r"^(hidden_layer_list|classifier_list)\.(\d+)\.(weight|bias)$")
_HEAD_MODULES = {"hidden_layer_list": "hidden_layer", "classifier_list": "classifier"}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_INV_FREQ_SUFFIX = "self_attn.rot_emb.inv_freq"
# config.json keys that change the forward pass without changing any tensor's shape.
_FORWARD_FLAGS = ("no_position_embeddings", "no_token_type_embeddings", "use_embed_layer_norm",
                  "use_last_layer_norm", "embed_scale", "token_dropout")  # fmt: skip
# Keys every LucaOne config.json has; without them the model's size would be a guess.
_REQUIRED_CONFIG_KEYS = ("hidden_size", "num_hidden_layers", "num_attention_heads")


@dataclass
class LoadReport:
    """What `load_lucaone_checkpoint` did, key by key.

    loaded: checkpoint keys (prefix stripped) whose values are now in the model.
    missing: encoder keys the checkpoint lacks; they keep their initial values.
    skipped_heads: checkpoint key -> why it was not loaded (task heads, modules the model lacks).
    loaded_heads: task -> checkpoint head index, for heads `load_lucaone_heads` loaded.
    head_state: the checkpoint's task-head tensors, kept for `load_lucaone_heads` (not summarised).
    unused_layers: keys of checkpoint layers beyond the model's depth (only with first_n_layers).
    messages: notes worth a log line (tying, config differences, the prefix that was stripped).
    """

    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    skipped_heads: dict[str, str] = field(default_factory=dict)
    loaded_heads: dict[str, int] = field(default_factory=dict)
    head_state: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    unused_layers: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    source: str = ""

    @property
    def unused_layer_indices(self) -> list[int]:
        return sorted({int(_LAYER_KEY.match(k).group(1)) for k in self.unused_layers})

    def summary(self) -> str:
        lines = [f"Loaded {len(self.loaded)} tensors from LucaOne checkpoint {self.source or '(unknown)'}."]
        if self.missing:
            lines.append(f"Missing from the checkpoint, left at their initial values ({len(self.missing)}): "
                         + ", ".join(self.missing))  # fmt: skip
        if self.loaded_heads:
            lines.append("Loaded task heads: " + ", ".join(f"{t} (checkpoint head {i})" for t, i in self.loaded_heads.items()))
        if self.skipped_heads:
            lines.append(f"Skipped task-head / non-encoder keys ({len(self.skipped_heads)}):")
            lines.extend(f"  {key}: {reason}" for key, reason in self.skipped_heads.items())
        if self.unused_layers:
            indices = ", ".join(map(str, self.unused_layer_indices))
            lines.append(f"Unused checkpoint layers {indices} ({len(self.unused_layers)} tensors, "
                         f"first_n_layers): " + ", ".join(self.unused_layers))  # fmt: skip
        lines.extend(f"Note: {m}" for m in self.messages)
        return "\n".join(lines)


def is_lucaone_checkpoint(directory) -> bool:
    """True for a LucaOne/LucaVirus `checkpoint-step<N>/` directory (config.json + pytorch.pth)."""
    try:
        directory = Path(directory)
        return directory.is_dir() and (directory / CONFIG_NAME).is_file() and (directory / STATE_DICT_NAME).is_file()
    except (TypeError, OSError):
        return False


def read_lucaone_config(directory) -> dict:
    """The checkpoint's config.json as a dict (clear errors for a missing or unreadable file)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a LucaOne checkpoint directory holds config.json and pytorch.pth)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(config, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(config).__name__}")
    return config


def read_lucaone_state_dict(directory) -> dict[str, torch.Tensor]:
    """`pytorch.pth` loaded with `weights_only=True` on CPU, with a leading `module.` stripped."""
    return _read_state_dict(Path(directory) / STATE_DICT_NAME)[0]


def _read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], int]:
    """(state dict with `module.` stripped, how many keys had it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (a LucaOne checkpoint directory holds config.json and pytorch.pth)")
    try:
        obj = _torch_load(path)
    except Exception as err:  # UnpicklingError for pickled objects; RuntimeError etc. for corrupt files
        raise ValueError(
            f"{path} could not be read with torch.load(weights_only=True): it must hold a plain state dict "
            f"of tensors (lucatrain never unpickles arbitrary objects; pytorch.pt, the pickled module, is "
            f"not supported). Cause: {type(err).__name__}: {err}"
        ) from err
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, expected a state dict (name -> tensor)")
    state: dict[str, torch.Tensor] = {}
    prefixed = 0
    for key, value in obj.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(f"{path} is not a state dict of tensors: entry {key!r} is a {type(value).__name__}")
        name = key
        if key.startswith(DDP_PREFIX):
            name, prefixed = key[len(DDP_PREFIX):], prefixed + 1
        if name in state:
            raise ValueError(f"{path} holds {name!r} both with and without the {DDP_PREFIX!r} prefix")
        state[name] = value
    return state, prefixed


def _torch_load(path: Path):
    # mmap: a multi-GB checkpoint is not read into memory a second time next to the model's weights.
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as err:
        if "mmap" not in str(err):  # a legacy (non-zip) torch.save file cannot be mapped
            raise
    return torch.load(path, map_location="cpu", weights_only=True)


def lucaone_config_to_kwargs(config_json: dict) -> dict:
    """`LucaGPLMConfig` keyword arguments from a LucaOne/LucaVirus config.json dict.

    LucaOne's key names equal `LucaGPLMConfig`'s, so this keeps the keys `LucaGPLMConfig` takes
    (sizes, embedding/LayerNorm flags, `embed_scale`, `token_dropout`, special token ids, `alphabet`,
    dropout probabilities, `intermediate_size` when present, else 4 x hidden_size as LucaOne
    hard-codes) and drops the rest (`model_type`, `architectures`, `hidden_act`, transformers
    bookkeeping, ...).

    Dropout: a LucaOne config.json holds `hidden_dropout_prob` (typically 0.1) and
    `attention_probs_dropout_prob`, yet LucaOne's transformer layers apply no dropout at all. lucatrain's
    layers DO apply `hidden_dropout_prob` on the residual branches in training, so continuing from such
    a checkpoint with the file's values trains with dropout the original run never had. The file's
    values are kept by default (they are what the file says); pass e.g. `hidden_dropout_prob=0.0` to
    `model_from_lucaone_checkpoint` (or update the returned dict) to reproduce LucaOne's behaviour.
    Evaluation (`model.eval()`) is unaffected either way.
    """
    if not isinstance(config_json, dict):
        raise TypeError(f"config_json must be a dict, got {type(config_json).__name__}")
    absent = [k for k in _REQUIRED_CONFIG_KEYS if config_json.get(k) is None]
    if absent:
        raise ValueError(f"LucaOne config.json lacks {absent}; cannot size the model")
    accepted = _config_parameters()
    kwargs = {k: v for k, v in config_json.items() if k in accepted}
    if kwargs.get("intermediate_size") is None:
        kwargs.pop("intermediate_size", None)  # LucaGPLMConfig then uses 4 x hidden_size
    return kwargs


def load_lucaone_checkpoint(
    directory,
    model: LucaGPLM,
    *,
    first_n_layers: bool = False,
) -> LoadReport:
    """Load a LucaOne/LucaVirus `checkpoint-step<N>/` directory into `model` (see the module doc).

    first_n_layers: allow a checkpoint with more layers than `model`; its first N layers are used.
    Task heads are not loaded here (the model is the encoder only): they wait in `report.head_state`
    for `load_lucaone_heads`.
    Raises FileNotFoundError (naming the path) for a missing file and ValueError for anything that
    does not fit: hidden size or heads, layer counts, a tensor's shape (naming the key and shapes).
    """
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / STATE_DICT_NAME
    ckpt_config = read_lucaone_config(directory)
    model_config: LucaGPLMConfig = model.config
    report = LoadReport(source=str(weights_path))

    _check_width(ckpt_config, model_config, config_path)
    state, prefixed = _read_state_dict(weights_path)
    if prefixed:
        report.messages.append(f"stripped the leading {DDP_PREFIX!r} (DDP) from {prefixed} checkpoint keys")

    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    n_model = len(model.layers)
    ckpt_layers = {int(m.group(1)) for k in state if (m := _LAYER_KEY.match(k))}
    n_ckpt = max(ckpt_layers) + 1 if ckpt_layers else 0
    cfg_layers = ckpt_config.get("num_hidden_layers")
    if cfg_layers is not None and cfg_layers != n_ckpt:
        report.messages.append(f"{config_path} says num_hidden_layers={cfg_layers} but {weights_path} "
                               f"holds {n_ckpt} layers; the tensors decide")  # fmt: skip
    if n_ckpt < n_model:
        raise ValueError(
            f"{weights_path} has {n_ckpt} transformer layers, the model has {n_model}: a checkpoint can "
            f"initialise at most as many layers as it holds (build the model with num_hidden_layers<={n_ckpt})"
        )
    if n_ckpt > n_model and not first_n_layers:
        raise ValueError(
            f"{weights_path} has {n_ckpt} transformer layers, the model has {n_model}; pass "
            f"first_n_layers=True to initialise the model from the checkpoint's first {n_model} layers"
        )

    to_load: dict[str, torch.Tensor] = {}
    mismatched: list[str] = []
    for key, tensor in state.items():
        m = _LAYER_KEY.match(key)
        if m and int(m.group(1)) >= n_model:
            report.unused_layers.append(key)
        elif key in expected:
            if tuple(tensor.shape) != expected[key]:
                mismatched.append(f"{key}: checkpoint {tuple(tensor.shape)} vs model {expected[key]}")
            else:
                to_load[key] = tensor
        elif _HEAD_KEY.match(key):
            report.head_state[key] = tensor
            report.skipped_heads[key] = "task head: not loaded (no matching task head in this run)"
        else:
            report.skipped_heads[key] = _skip_reason(key, ckpt_config, model_config)
    if mismatched:
        raise ValueError(f"{weights_path} does not fit the model (shape mismatches): " + "; ".join(mismatched))

    # The tied embedding: one Parameter, loaded once, preferably from embed_tokens.weight.
    if EMBED_KEY in to_load and TIED_KEY in to_load:
        lm = to_load.pop(TIED_KEY)
        if not torch.equal(lm.to(to_load[EMBED_KEY].dtype), to_load[EMBED_KEY]):
            report.messages.append(f"{TIED_KEY} differs from {EMBED_KEY} in the checkpoint; the model ties "
                                   f"them, so {EMBED_KEY} was used for both")  # fmt: skip
        else:
            report.messages.append(f"{TIED_KEY} is tied to {EMBED_KEY}: loaded once")
    elif TIED_KEY in to_load:
        to_load[EMBED_KEY] = to_load.pop(TIED_KEY)
        report.messages.append(f"{EMBED_KEY} absent; loaded the tied weight from {TIED_KEY}")

    _check_rotary(to_load, report)
    result = model.load_state_dict(to_load, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys  # every key was checked against the model
    assert model.lm_head.weight is model.embed_tokens.weight
    report.loaded = sorted(to_load)

    have = set(to_load) | ({TIED_KEY} if EMBED_KEY in to_load else set())
    absent = sorted(k for k in expected if k not in have)
    rotary = [k for k in absent if k.endswith(_INV_FREQ_SUFFIX)]
    report.missing = [k for k in absent if not k.endswith(_INV_FREQ_SUFFIX)]
    if rotary:
        report.messages.append("rotary buffers absent from the checkpoint (computed, not learned; nothing lost): "
                               + ", ".join(rotary))  # fmt: skip
    if report.unused_layers:
        report.messages.append(f"first_n_layers: initialised the model's {n_model} layers from the first "
                               f"{n_model} of the checkpoint's {n_ckpt}")  # fmt: skip
    for flag in _FORWARD_FLAGS:
        if flag in ckpt_config and ckpt_config[flag] != getattr(model_config, flag):
            report.messages.append(f"{flag}: checkpoint config.json has {ckpt_config[flag]!r}, the model "
                                   f"uses {getattr(model_config, flag)!r} (hidden states will differ)")  # fmt: skip
    return report


def model_from_lucaone_checkpoint(
    directory,
    *,
    first_n_layers: bool = False,
    **overrides,
) -> tuple[LucaGPLM, LoadReport]:
    """Build a `LucaGPLM` sized from the checkpoint's config.json (`overrides` win, e.g.
    `hidden_dropout_prob=0.0`, `gradient_checkpointing=True`, or `num_hidden_layers=N` together
    with `first_n_layers=True`) and load the checkpoint into it."""
    directory = Path(directory)
    accepted = _config_parameters()
    unknown = sorted(set(overrides) - accepted)
    if unknown:
        raise ValueError(f"unknown config override(s) {unknown}; valid keys: {sorted(accepted)}")
    if not (directory / STATE_DICT_NAME).is_file():  # fail before building a large model
        raise FileNotFoundError(f"{directory / STATE_DICT_NAME} not found "
                                f"(a LucaOne checkpoint directory holds config.json and pytorch.pth)")  # fmt: skip
    kwargs = {**lucaone_config_to_kwargs(read_lucaone_config(directory)), **overrides}
    model = LucaGPLM(LucaGPLMConfig(**kwargs))
    report = load_lucaone_checkpoint(directory, model, first_n_layers=first_n_layers)
    return model, report


# --------------------------------------------------------------------------- helpers


def _config_parameters() -> set[str]:
    params = inspect.signature(LucaGPLMConfig.__init__).parameters
    return {name for name, p in params.items() if name != "self" and p.kind is p.POSITIONAL_OR_KEYWORD}


def _check_width(ckpt_config: dict, model_config: LucaGPLMConfig, config_path: Path) -> None:
    """Hidden size and head count must agree (a head-count change alters no shape, only the math)."""
    theirs = (ckpt_config.get("hidden_size"), ckpt_config.get("num_attention_heads"))
    ours = (model_config.hidden_size, model_config.num_attention_heads)
    if theirs[0] is None:
        raise ValueError(f"{config_path} has no hidden_size")
    if theirs[0] != ours[0] or (theirs[1] is not None and theirs[1] != ours[1]):
        raise ValueError(
            f"the checkpoint and the model differ in width: checkpoint {config_path} has hidden_size={theirs[0]}, "
            f"num_attention_heads={theirs[1]}; the model's config.json has hidden_size={ours[0]}, "
            f"num_attention_heads={ours[1]}. Only the number of layers may differ (first_n_layers=True)."
        )


def _skip_reason(key: str, ckpt_config: dict, model_config: LucaGPLMConfig) -> str:
    parts = key.split(".")
    if parts[0].startswith("embed_") or parts[0] in ("last_layer_norm", "lm_head", "layers"):
        flags = {f: ckpt_config[f] for f in _FORWARD_FLAGS
                 if f in ckpt_config and ckpt_config[f] != getattr(model_config, f)}  # fmt: skip
        return ("encoder weight of a module this model does not have (checkpoint config.json differs: "
                f"{flags or 'no documented flag'})")  # fmt: skip
    if any(marker in p for p in parts for marker in HEAD_MARKERS):
        return "task head in a layout lucatrain does not map to a task"
    return "not part of the encoder"


def infer_head_tasks(num_heads: int) -> list[str] | None:
    """The tasks of a LucaOne checkpoint's head lists, in order, when its head count identifies them.

    LucaOne builds its head lists in task-table order over the tasks it trained (span level, then
    seq level, then structure level). 8 heads: the full LucaOne v2.0 set; 7: LucaVirus v1.0 (the
    same without prot_structure). Any other count is ambiguous: None (set `model.lucaone_head_tasks`).
    """
    from lucatrain.families.lucaone.specs import TASKS

    every = [name for name, spec in TASKS.items() if spec.has_head]
    return {len(every): every, len(every) - 1: [n for n in every if n != "prot_structure"]}.get(num_heads)


def load_lucaone_heads(report: LoadReport, heads, head_tasks: list[str] | None = None) -> None:
    """Copy the checkpoint's task heads (kept in `report.head_state`) into this run's `heads`.

    heads: task name -> module with `hidden_layer` and `classifier` Linear layers (this run's heads).
    head_tasks: the task of each checkpoint head index, in order; None infers it (`infer_head_tasks`).
    A head loads only when its task is trained here and both layers' shapes match (same classifier
    size, same label count); otherwise every one of its keys keeps a skip reason saying why.
    """
    indices = sorted({int(_HEAD_KEY.match(k).group(2)) for k in report.head_state})
    if not indices:
        return
    order = list(head_tasks) if head_tasks else infer_head_tasks(len(indices))
    if order is None:
        for key in report.head_state:
            report.skipped_heads[key] = (f"task head: the checkpoint has {len(indices)} heads, which does not tell "
                                         "which task each is; set `model.lucaone_head_tasks` to their task names "
                                         "in order")  # fmt: skip
        return
    if len(order) != len(indices):
        raise ValueError(f"`model.lucaone_head_tasks` names {len(order)} tasks but {report.source} holds "
                         f"{len(indices)} task heads (indices {indices})")  # fmt: skip
    for index, task in zip(indices, order):
        keys = {f"{lst}.{index}.{part}": (_HEAD_MODULES[lst], part)
                for lst in _HEAD_MODULES for part in ("weight", "bias")}  # fmt: skip
        keys = {k: v for k, v in keys.items() if k in report.head_state}
        if task not in heads:
            reason = f"task head {index} ({task}): this run does not train {task}"
        else:
            mismatched = []
            for key, (module, part) in keys.items():
                ours = getattr(getattr(heads[task], module), part)
                if tuple(ours.shape) != tuple(report.head_state[key].shape):
                    mismatched.append(f"{module}.{part} {tuple(report.head_state[key].shape)} in the checkpoint vs "
                                      f"{tuple(ours.shape)} here")  # fmt: skip
            reason = (f"task head {index} ({task}): label count or classifier size differ: " + "; ".join(mismatched)
                      if mismatched else "")  # fmt: skip
            if not mismatched:
                with torch.no_grad():
                    for key, (module, part) in keys.items():
                        getattr(getattr(heads[task], module), part).copy_(report.head_state[key])
                report.loaded_heads[task] = index
        for key in keys:
            if reason:
                report.skipped_heads[key] = reason
            else:
                report.skipped_heads.pop(key, None)
                report.loaded.append(key)


def _check_rotary(to_load: dict[str, torch.Tensor], report: LoadReport) -> None:
    """lucatrain always recomputes base-10000 frequencies; say so if the checkpoint's buffer disagrees."""
    for key, value in to_load.items():
        if key.endswith(_INV_FREQ_SUFFIX):
            d = 2 * value.numel()
            fresh = 1.0 / ROPE_BASE ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
            if not torch.allclose(value.float(), fresh, rtol=1e-2, atol=0.0):
                report.messages.append(f"{key} is not base-{ROPE_BASE:g} rotary; lucatrain computes base "
                                       f"{ROPE_BASE:g} frequencies, so hidden states will differ")  # fmt: skip
                return
