"""Typed run configuration: YAML recipe + dotted CLI overrides, validated before any work starts.

Precedence, stated once: **CLI overrides > YAML recipe > dataclass defaults.**

A dotted key mirrors the YAML nesting: `train.gradient_accumulation_steps=32` sets
`train: {gradient_accumulation_steps: 32}`. Values on the command line are parsed as YAML scalars
(`8` is an int, `1e-4` a float, `true` a bool, `[a, b]` a list).

Every section is a dataclass; the docstring under a field is its documentation. Unknown keys and
bad values raise `ConfigError` naming the dotted key and, where there is a fixed set, the valid
choices, so a typo fails in the first second and not after hours of compute.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config key or value; the message names the dotted key."""


def _check_choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ConfigError(f"`{key}` must be one of {list(choices)}, got {value!r}")


def _check_positive(key: str, value, allow_zero: bool = False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"`{key}` must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, logs/, tensorboard/, checkpoints/, best/, last/ go here."""
    seed: int = 1221
    """Seeds the sample order, the masks and the model initialisation."""
    batch_size: int = 8
    """Micro-batch size per process (samples), used when `data.max_tokens` is 0."""
    gradient_accumulation_steps: int = 1
    """Micro-batches per process accumulated into one optimizer step."""
    max_steps: int = 1000
    """Stop after this many optimizer steps (0 = run `num_train_epochs` epochs)."""
    num_train_epochs: int = 1
    """Upper bound on epochs; training stops at whichever of max_steps / epochs comes first."""
    learning_rate: float = 2e-4
    """Peak learning rate, reached at the end of warmup."""
    lr2: float = 0.0
    """Learning rate at `max_steps` for the linear and cosine schedules (LucaOne's --lr2)."""
    lr_scheduler: str = "linear"
    """'linear' (warmup, then linear decay learning_rate -> lr2 at max_steps, as LucaOne), 'cosine', 'constant'."""
    warmup_steps: int = 100
    """Optimizer steps of linear warmup from 0 to learning_rate."""
    weight_decay: float = 0.01
    """AdamW weight decay; never applied to biases, LayerNorm weights or embeddings of token types."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.98
    """AdamW beta2."""
    adam_epsilon: float = 1e-8
    """AdamW epsilon."""
    max_grad_norm: float = 1.0
    """Gradient clipping by global norm (0 = off); handed to DeepSpeed as `gradient_clipping`."""
    loss_logging_steps: int = 10
    """Every N optimizer steps: write the window's mean per-task losses (averaged over ranks)."""
    logging_steps: int = 50
    """Every N optimizer steps: write lr, grad norm, throughput and memory."""
    eval_steps: int = 0
    """Every N optimizer steps: evaluate on the dev set (0 = only at the end)."""
    save_steps: int = 0
    """Every N optimizer steps: DeepSpeed checkpoint (0 = only at the end)."""
    trained_checkpoint: str = ""
    """Resume: 'latest', a step number, or a checkpoint directory (LucaVirus's --trained_checkpoint).
    Checkpoints are looked up in `model.model_dirpath`/checkpoints when that is a run directory,
    else in `output_dir`/checkpoints."""
    save_total_limit: int = 3
    """Keep the newest N committed checkpoints (0 = all); the one `latest` names is never deleted."""
    best_metric: str = "loss"
    """Dev metric choosing the `best/` export: 'loss' (the weighted total, lower is better) or
    '<task>/<metric>' (loss, acc, micro_f1, macro_f1, mae; names ending in acc or f1 are higher-better)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""

    def validate(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("max_steps", "num_train_epochs", "warmup_steps", "eval_steps", "save_steps"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("loss_logging_steps", "logging_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.save_total_limit", self.save_total_limit, allow_zero=True)
        t = self.trained_checkpoint
        if t and t != "latest" and not t.isdigit() and not Path(t).is_dir():
            raise ConfigError(f"`train.trained_checkpoint` must be 'latest', a step number or a checkpoint directory, got {t!r}")
        if self.max_steps == 0 and self.num_train_epochs == 0:
            raise ConfigError("one of `train.max_steps` or `train.num_train_epochs` must be > 0")
        _check_positive("train.learning_rate", self.learning_rate)
        _check_positive("train.lr2", self.lr2, allow_zero=True)
        _check_choice("train.lr_scheduler", self.lr_scheduler, ("linear", "cosine", "constant"))
        if self.lr_scheduler in ("linear", "cosine") and self.max_steps == 0:
            raise ConfigError(f"`train.lr_scheduler={self.lr_scheduler}` decays to lr2 at `train.max_steps`; set it > 0")
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise ConfigError(f"`train.warmup_steps` ({self.warmup_steps}) exceeds `train.max_steps` ({self.max_steps})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"`train.{name}` must be in [0, 1), got {getattr(self, name)}")
        _check_positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training inputs: files or directories (LucaOne CSV, FASTA, Swiss-Prot .dat, Parquet, JSONL), or one prepared dataset directory."""
    dev_files: list[str] = field(default_factory=list)
    """Dev inputs for periodic evaluation (empty = no evaluation)."""
    format: str = "auto"
    """Input format: 'auto' (by extension), 'lucaone_csv', 'fasta', 'swissprot', 'parquet', 'jsonl'."""
    fasta_obj_type: str = "auto"
    """Molecule type of FASTA records: 'auto' (detected per record), 'gene', 'prot'."""
    bad_records: str = "fail"
    """Malformed records: 'fail' (stop, naming file and line) or 'skip' (count them into rejects.jsonl)."""
    cache_dir: str = "~/.cache/lucatrain/prepared"
    """Where raw inputs are prepared on the fly (keyed by their fingerprint, reused across runs)."""
    max_length: int = 1026
    """Tokens per sequence including [CLS] and [SEP] (LucaVirus: 3074)."""
    truncation: str = "right"
    """Over-long sequences: 'right' keeps the start, 'left' keeps the end."""
    max_tokens: int = 0
    """Token budget per micro-batch (padded tokens, B x L_max); 0 = fixed `train.batch_size`."""
    bucket_size: int = 100
    """Token-budget batching sorts pools of this many micro-batches' worth of samples by length."""
    num_workers: int = 0
    """DataLoader worker processes for tokenize+mask+pad (0 = in the training process)."""

    def validate(self) -> None:
        _check_choice("data.format", self.format, ("auto", "lucaone_csv", "fasta", "swissprot", "parquet", "jsonl"))
        _check_choice("data.fasta_obj_type", self.fasta_obj_type, ("auto", "gene", "prot"))
        _check_choice("data.bad_records", self.bad_records, ("fail", "skip"))
        _check_choice("data.truncation", self.truncation, ("right", "left"))
        if self.max_length < 3:
            raise ConfigError(f"`data.max_length` must be >= 3 ([CLS] + residue + [SEP]), got {self.max_length}")
        _check_positive("data.max_tokens", self.max_tokens, allow_zero=True)
        if self.max_tokens and self.max_tokens < self.max_length:
            raise ConfigError(
                f"`data.max_tokens` ({self.max_tokens}) must be >= `data.max_length` ({self.max_length}) "
                "so the longest sequence fits in a micro-batch"
            )
        _check_positive("data.bucket_size", self.bucket_size)
        _check_positive("data.num_workers", self.num_workers, allow_zero=True)


@dataclass
class ModelConfig:
    model_type: str = "lucaone_gplm"
    """Model family (registry name)."""
    model_dirpath: str = ""
    """Initialise weights from a lucatrain export (config.json + model.safetensors) or a LucaOne/LucaVirus
    checkpoint directory (config.json + pytorch.pth; sizes then come from its config.json). With
    `train.trained_checkpoint`, the run or checkpoint directory to resume from."""
    init_first_n_layers: bool = False
    """From a LucaOne checkpoint with more layers than `num_hidden_layers`, take its first N layers."""
    lucaone_head_tasks: list[str] = field(default_factory=list)
    """The task of each task head in a LucaOne checkpoint (`classifier_list.<i>`), in order. Empty:
    inferred from the head count (8: LucaOne v2.0's span, seq and structure tasks in table order;
    7: LucaVirus v1.0, the same without prot_structure)."""
    hidden_size: int = 2560
    """Width of the encoder."""
    num_hidden_layers: int = 12
    """Transformer layers."""
    num_attention_heads: int = 20
    """Attention heads; must divide hidden_size."""
    intermediate_size: int = 0
    """Feed-forward width (0 = 4 x hidden_size, as LucaOne)."""
    max_position_embeddings: int = 4096
    """Longest position the model supports."""
    hidden_dropout_prob: float = 0.1
    """Dropout on residual branches."""
    attention_probs_dropout_prob: float = 0.0
    """Dropout on attention weights."""
    token_dropout: bool = True
    """ESM-style rescaling of embeddings at [MASK] positions."""
    gradient_checkpointing: bool = False
    """Recompute each layer's activations in backward (less memory, ~30% more compute)."""

    def validate(self) -> None:
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings"):
            _check_positive(f"model.{name}", getattr(self, name))
        _check_positive("model.intermediate_size", self.intermediate_size, allow_zero=True)
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"`model.hidden_size` ({self.hidden_size}) must be divisible by `model.num_attention_heads` ({self.num_attention_heads})"
            )
        if (self.hidden_size // self.num_attention_heads) % 2:
            raise ConfigError("head size (`model.hidden_size` / `model.num_attention_heads`) must be even for rotary embeddings")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"`model.{name}` must be in [0, 1), got {getattr(self, name)}")
        from lucatrain.tasks import TASK_NAMES

        for name in self.lucaone_head_tasks:
            if name not in TASK_NAMES:
                raise ConfigError(f"`model.lucaone_head_tasks`: unknown task {name!r}; valid tasks are {list(TASK_NAMES)}")


@dataclass
class TasksConfig:
    names: list[str] = field(default_factory=lambda: ["gene_mask", "prot_mask"])
    """Pretraining tasks to run, exact names (LucaOne's --pretrain_task_level_name); empty = every task
    of `level_types`. Tasks: gene_mask, prot_mask (token); gene_type, prot_homo, prot_site, prot_domain
    (span); gene_taxonomy, prot_taxonomy, prot_keyword (seq); prot_structure (structure)."""
    level_types: list[str] = field(default_factory=lambda: ["all"])
    """Task levels to train (LucaOne's --pretrain_task_level_type): token_level, span_level, seq_level,
    structure_level, or all. Every task in `names` must belong to one of them."""
    weights: dict[str, float] = field(default_factory=dict)
    """Loss weight per task name (missing: LucaVirus's 1.0 for masked-LM, keywords and structure, 0.2 for
    span and taxonomy tasks). The loss is the weighted sum over tasks."""
    label_dir: str = ""
    """Directory of the label files `<task>.txt` (a `label` header line, then one name per line; the
    class count of a task's head is their number). Empty: `label/` beside the train files' directory,
    as in LucaOne's dataset layout (<dataset>/train, <dataset>/label)."""
    classifier_sizes: dict[str, int] = field(default_factory=dict)
    """Hidden width of a task head (LucaOne's --<task>_classifier_size); missing: the LucaOne v2.0
    script values (gene_type 128, prot_homo 4096, prot_site 1024, prot_domain 10240, taxonomy and
    keyword 2048, structure 128)."""
    classifier_dropout: float = 0.0
    """Dropout before each task head's hidden layer (LucaOne's scripts: 0)."""
    output_modes: dict[str, str] = field(default_factory=dict)
    """Output mode per task where it differs from LucaOne's: gene_taxonomy, prot_taxonomy and prot_keyword
    may each be multi_class (one label index per record) or multi_label (a list; unlisted = negative)."""
    loss_types: dict[str, str] = field(default_factory=dict)
    """Loss per task where it differs from LucaOne's: cce (multi_class), bce (multi_label), and for
    prot_structure l1 (default), l2 or smooth_l1."""
    mask_prob: float = 0.15
    """Fraction of residues selected for masked-LM (at least one per sequence)."""
    mask_token_prob: float = 0.8
    """Of the selected residues: fraction replaced by [MASK]."""
    random_token_prob: float = 0.1
    """Of the selected residues: fraction replaced by a random residue of the same molecule."""

    def selected(self) -> list[str]:
        """The task names this config trains, in the task table's order."""
        from lucatrain.tasks.specs import select_tasks

        return select_tasks(self.level_types, self.names)

    def validate(self) -> None:
        from lucatrain.tasks import TASK_NAMES

        try:
            chosen = self.selected()
        except ValueError as err:
            raise ConfigError(f"`tasks.names` / `tasks.level_types`: {err}") from None
        if not chosen:
            raise ConfigError(f"`tasks.names` selects no task; choose from {list(TASK_NAMES)}")
        for section in ("weights", "classifier_sizes", "output_modes", "loss_types"):
            for name in getattr(self, section):
                if name not in TASK_NAMES:
                    raise ConfigError(f"`tasks.{section}`: unknown task {name!r}; valid tasks are {list(TASK_NAMES)}")
        for name, weight in self.weights.items():
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or weight < 0:
                raise ConfigError(f"`tasks.weights.{name}` must be a number >= 0, got {weight!r}")
        for name, size in self.classifier_sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise ConfigError(f"`tasks.classifier_sizes.{name}` must be an integer > 0, got {size!r}")
        from lucatrain.tasks.pretrain import resolve_modes

        try:
            resolve_modes(list(TASK_NAMES), self.output_modes, self.loss_types)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        if not 0.0 <= self.classifier_dropout < 1.0:
            raise ConfigError(f"`tasks.classifier_dropout` must be in [0, 1), got {self.classifier_dropout}")
        if not 0.0 < self.mask_prob < 1.0:
            raise ConfigError(f"`tasks.mask_prob` must be in (0, 1), got {self.mask_prob}")
        for name in ("mask_token_prob", "random_token_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"`tasks.{name}` must be in [0, 1], got {getattr(self, name)}")
        if self.mask_token_prob + self.random_token_prob > 1.0:
            raise ConfigError("`tasks.mask_token_prob` + `tasks.random_token_prob` must be <= 1")


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to <output_dir>/tensorboard."""
    level: str = "INFO"
    """Log level of logs/training.log and the console."""

    def validate(self) -> None:
        _check_choice("logger.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))


@dataclass
class LoraConfig:
    enabled: bool = False
    """Train LoRA adapters (peft) instead of all weights, e.g. to continue from a large checkpoint."""
    r: int = 8
    """LoRA rank."""
    alpha: int = 16
    """LoRA scaling numerator."""
    dropout: float = 0.0
    """Dropout on the LoRA branch."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    """Module names that receive adapters."""

    def validate(self) -> None:
        if self.enabled:
            _check_positive("lora.r", self.r)
            _check_positive("lora.alpha", self.alpha)
            if not self.target_modules:
                raise ConfigError("`lora.target_modules` is empty")


@dataclass
class BnbConfig:
    enabled: bool = False
    """8-bit optimizer states through bitsandbytes (CUDA only)."""

    def validate(self) -> None:
        if self.enabled:
            raise ConfigError(
                "`bnb.enabled=true` needs bitsandbytes on CUDA GPUs; lucatrain does not support it yet. "
                "Use `deepspeed.config=ds_configs/zero3_offload.json` to cut optimizer memory instead."
            )


@dataclass
class DeepSpeedConfig:
    config: str = "zero2"
    """DeepSpeed JSON: a shipped name (zero0, zero1, zero2, zero3, zero3_offload) or a path."""
    precision: str = "bf16"
    """'fp32', 'bf16' or 'fp16' (overrides the JSON's bf16/fp16 sections)."""

    def validate(self) -> None:
        _check_choice("deepspeed.precision", self.precision, ("fp32", "bf16", "fp16"))
        from lucatrain.engine import SHIPPED_DS_CONFIGS, resolve_ds_config_path

        try:
            resolve_ds_config_path(self.config)
        except FileNotFoundError as err:
            raise ConfigError(
                f"`deepspeed.config`: {err}; shipped configs are {list(SHIPPED_DS_CONFIGS)}"
            ) from None


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: TasksConfig = field(default_factory=TasksConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bnb: BnbConfig = field(default_factory=BnbConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            getattr(self, section.name).validate()
        if self.data.max_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"`data.max_length` ({self.data.max_length}) exceeds `model.max_position_embeddings` "
                f"({self.model.max_position_embeddings})"
            )
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


SECTION_TYPES = {f.name: f.type for f in dataclasses.fields(Config)}


# ----------------------------------------------------------------------------- loading


def _coerce(key: str, value: Any, annotation) -> Any:
    """Check `value` against the field's annotation (as a string, from `from __future__ import annotations`)."""
    kind = str(annotation)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if kind == "float":
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return str(value)
    if kind.startswith("list"):
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        return [str(v) for v in value]
    if kind.startswith("dict"):
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}")
        return dict(value)
    raise AssertionError(f"unhandled annotation {kind} for {key}")


def _section_from_dict(name: str, values: dict) -> Any:
    cls = typing.get_type_hints(Config)[name]
    fields = {f.name: f for f in dataclasses.fields(cls)}
    section = cls()
    if not isinstance(values, dict):
        raise ConfigError(f"`{name}` must be a mapping of keys, got {values!r}")
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(f"unknown config key `{name}.{key}`; valid keys in `{name}` are {sorted(fields)}")
        setattr(section, key, _coerce(f"{name}.{key}", value, fields[key].type))
    return section


def _merge(base: dict, key: str, value: Any) -> None:
    """Set dotted `key` inside nested dict `base`; dict values below the section level merge."""
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override `{key}` must be `section.key=value`; sections are {list(SECTION_TYPES)}")
    node = base
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override `{key}`: `{part}` is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=10' -> ('train.max_steps', 10); the value is parsed as a YAML scalar."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like `section.key=value`")
    key, raw = text.split("=", 1)
    value = yaml.safe_load(raw) if raw.strip() else ""
    return key.strip(), value


def load_config(yaml_path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML recipe, then `section.key=value` overrides; validated."""
    raw: dict = {}
    if yaml_path is not None:
        path = Path(yaml_path)
        if not path.is_file():
            path = _shipped_recipe(str(yaml_path))
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: a recipe must be a mapping of sections {list(SECTION_TYPES)}")
    for text in overrides or []:
        _merge(raw, *parse_override(text))
    for name in raw:
        if name not in SECTION_TYPES:
            raise ConfigError(f"unknown config section `{name}`; valid sections are {list(SECTION_TYPES)}")
    sections = {name: _section_from_dict(name, raw.get(name, {})) for name in SECTION_TYPES}
    return Config(**sections).validate()


RECIPE_DIR = Path(__file__).with_name("configs")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _shipped_recipe(name: str) -> Path:
    stem = Path(name).name.removesuffix(".yaml")
    path = RECIPE_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {name!r} not found; shipped recipes are {shipped_recipes()}")
    return path
