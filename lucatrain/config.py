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
class EarlyStoppingConfig:
    monitor: str = ""
    """The dev metric watched, named as `train.best_metric` ('<metric>' of the first dev split, or
    '<split>/<metric>'); empty: no early stopping. Lightning's `val_loss` is `val/loss` here when the
    dev split is named val."""
    patience: int = 3
    """Evaluations without an improvement of more than `min_delta` before the run stops."""
    min_delta: float = 0.0
    mode: str = "auto"
    """'min', 'max', or 'auto': the direction the family declares for the metric."""

    def validate(self) -> None:
        _check_positive("train.early_stopping.patience", self.patience)
        _check_positive("train.early_stopping.min_delta", self.min_delta, allow_zero=True)
        _check_choice("train.early_stopping.mode", self.mode, ("auto", "min", "max"))


@dataclass
class TrainConfig:
    output_dir: str = "runs/default"
    """Run directory: config.yaml, logs/, tensorboard/, checkpoints/, best/, last/ go here. A directory
    that already holds files is refused unless the run resumes (`trained_checkpoint`) or
    `overwrite_output_dir` is set."""
    overwrite_output_dir: bool = False
    """Start afresh in a run directory that holds an earlier run: its checkpoints, exports, logs and
    history are deleted first (only in a directory that looks like a lucatrain run)."""
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
    """Learning rate at the run's last step for the linear and cosine schedules (LucaOne's --lr2)."""
    lr_scheduler: str = "linear"
    """'linear' (warmup, then linear decay learning_rate -> lr2 at the schedule's end, as LucaOne),
    'cosine' (warmup, then a half cosine learning_rate -> lr2: torch's CosineAnnealingLR with eta_min
    = lr2), 'constant' (warmup, then learning_rate), or 'one_cycle' (torch's OneCycleLR as CLIBD uses it:
    from learning_rate / one_cycle_div_factor up to learning_rate over `one_cycle_pct_start` of the
    schedule, then a cosine down to that start / one_cycle_final_div_factor; warmup_steps unused). All
    count optimizer steps. The schedule ends at `schedule_steps`, by default the run's last step:
    `max_steps`, or with `max_steps: 0` the end of `num_train_epochs` epochs at the run's world size (so
    give `max_steps` to a run whose number of processes may change on resume)."""
    schedule_steps: int = 0
    """Where the linear and cosine schedules reach lr2, in optimizer steps (PyTorch's T_max); after it
    the rate stays at lr2. 0: `schedule_epochs`, else the run's last step."""
    schedule_epochs: float = 0.0
    """The same in epochs (Lightning's T_max for a per-epoch cosine): that many epochs of optimizer
    steps at the run's world size. Used when `schedule_steps` is 0."""
    one_cycle_pct_start: float = 0.3
    one_cycle_div_factor: float = 25.0
    one_cycle_final_div_factor: float = 1e4
    """OneCycleLR's pct_start, div_factor and final_div_factor (its defaults, CLIBD's choice)."""
    optimizer: str = "adamw"
    """'adamw', 'adam' (weight decay added to the gradient, as torch's Adam), 'sgd' (`momentum`,
    `nesterov`) or 'lars' (SGD with momentum and a layer-wise trust ratio, the SimCLR paper's optimizer;
    ZeRO-0 only: ZeRO flattens the layers whose norms LARS needs). Biases and norm weights (every 1-d
    parameter) get no weight decay, and LARS does not adapt them."""
    momentum: float = 0.9
    """SGD and LARS momentum."""
    nesterov: bool = False
    """Nesterov momentum for SGD."""
    lars_trust_coefficient: float = 0.001
    """LARS's eta: a layer's step is eta * ||w|| / ||g + wd w|| of the learning rate."""
    early_stopping: EarlyStoppingConfig = field(default_factory=lambda: EarlyStoppingConfig())
    """Stop when a dev metric stops improving (Lightning's EarlyStopping; its counters survive a resume)."""
    callbacks: list[str] = field(default_factory=list)
    """Extra step callbacks, as 'package.module:ClassName' (a lucatrain.callbacks.StepCallback subclass
    built with no arguments): they see every optimizer step and every evaluation, and their state goes
    into each checkpoint."""
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
    eval_start_step: int = 0
    """No periodic evaluation at or before this step (CLIBD's eval_skip_epoch, in steps); the one at
    the end is always run."""
    save_steps: int = 0
    """Every N optimizer steps: DeepSpeed checkpoint (0 = only at the end)."""
    trained_checkpoint: str = ""
    """Resume: 'latest', a step number, or a checkpoint directory (LucaVirus's --trained_checkpoint);
    'auto': the newest complete checkpoint if there is one, else a fresh start (for schedulers that
    rerun one command after a preemption).
    Checkpoints are looked up in `model.model_dirpath`/checkpoints when that is a run directory,
    else in `output_dir`/checkpoints."""
    save_total_limit: int = 3
    """Keep the newest N committed checkpoints (0 = all); the one `latest` names is never deleted."""
    best_metric: str = "loss"
    """Dev metric choosing the `best/` export: one the model family's Task declares (with its direction,
    e.g. LucaOne: 'loss', the weighted total, or '<task>/<metric>' with loss, acc, micro_f1, macro_f1,
    mae), of the first dev split, or '<split>/<metric>' of a named one (`data.dev_splits`)."""
    progress_bar: bool = True
    """Show a tqdm bar on rank 0."""
    divergence_factor: float = 100.0
    """Stop the run (no checkpoint, no export) when a logged training loss exceeds this many times the
    lowest logged so far (a learning-rate typo: 7.5 -> 1e8); 0 = off. A non-finite loss, report value or
    gradient norm stops it at any step (see `nonfinite`)."""
    nonfinite: str = "stop"
    """A step whose loss or gradients are not finite: 'stop' the run (nothing of it is saved), or 'skip'
    the update as DeepSpeed's fp16 loss scaler does (the weights and optimizer state stay those of the
    step before; its samples count as consumed; logged with the step and task). 'skip' needs DeepSpeed's
    overflow check: deepspeed.precision=bf16 at ZeRO stage 1 or 2, or fp16."""
    max_consecutive_skips: int = 10
    """With `nonfinite=skip`: stop the run when this many steps in a row were skipped."""

    def validate(self) -> None:
        if not str(self.output_dir).strip():
            raise ConfigError("`train.output_dir` is empty; name the run directory, e.g. `train.output_dir=runs/my_run`")
        for name in ("batch_size", "gradient_accumulation_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        for name in ("max_steps", "num_train_epochs", "warmup_steps", "eval_steps", "eval_start_step", "save_steps"):
            _check_positive(f"train.{name}", getattr(self, name), allow_zero=True)
        for name in ("loss_logging_steps", "logging_steps"):
            _check_positive(f"train.{name}", getattr(self, name))
        _check_positive("train.save_total_limit", self.save_total_limit, allow_zero=True)
        t = self.trained_checkpoint
        if t and t not in ("latest", "auto") and not t.isdigit() and not Path(t).is_dir():
            raise ConfigError(f"`train.trained_checkpoint` must be 'latest', 'auto', a step number or a checkpoint directory, got {t!r}")
        if self.max_steps == 0 and self.num_train_epochs == 0:
            raise ConfigError("one of `train.max_steps` or `train.num_train_epochs` must be > 0")
        _check_positive("train.learning_rate", self.learning_rate)
        _check_positive("train.lr2", self.lr2, allow_zero=True)
        _check_choice("train.lr_scheduler", self.lr_scheduler, ("linear", "cosine", "constant", "one_cycle"))
        _check_positive("train.schedule_steps", self.schedule_steps, allow_zero=True)
        _check_positive("train.schedule_epochs", self.schedule_epochs, allow_zero=True)
        if not 0.0 < self.one_cycle_pct_start < 1.0:
            raise ConfigError(f"`train.one_cycle_pct_start` must be in (0, 1), got {self.one_cycle_pct_start}")
        _check_positive("train.one_cycle_div_factor", self.one_cycle_div_factor)
        _check_positive("train.one_cycle_final_div_factor", self.one_cycle_final_div_factor)
        _check_choice("train.optimizer", self.optimizer, ("adamw", "adam", "sgd", "lars"))
        if not 0.0 <= self.momentum < 1.0:
            raise ConfigError(f"`train.momentum` must be in [0, 1), got {self.momentum}")
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ConfigError("`train.nesterov` needs `train.optimizer=sgd` with `train.momentum` > 0")
        self.early_stopping.validate()
        for path in self.callbacks:
            if ":" not in path:
                raise ConfigError(f"`train.callbacks`: {path!r} is not 'package.module:ClassName'")
        if self.max_steps and self.warmup_steps > self.max_steps:
            raise ConfigError(f"`train.warmup_steps` ({self.warmup_steps}) exceeds `train.max_steps` ({self.max_steps})")
        for name in ("adam_beta1", "adam_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"`train.{name}` must be in [0, 1), got {getattr(self, name)}")
        _check_positive("train.max_grad_norm", self.max_grad_norm, allow_zero=True)
        _check_choice("train.nonfinite", self.nonfinite, ("stop", "skip"))
        _check_positive("train.max_consecutive_skips", self.max_consecutive_skips)
        if self.divergence_factor != 0 and self.divergence_factor <= 1:
            raise ConfigError(f"`train.divergence_factor` must be > 1 (or 0 = off), got {self.divergence_factor}")


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)
    """Training inputs: files or directories (LucaOne CSV/TSV, FASTA, FASTQ, Swiss-Prot .dat, Parquet, JSONL), or one
    prepared dataset directory. Files of a directory that are not inputs are named in the log."""
    dev_files: list[str] = field(default_factory=list)
    """Dev inputs for periodic evaluation (empty = no evaluation), logged as `eval/<metric>`."""
    dev_splits: dict[str, list[str]] = field(default_factory=dict)
    """More dev sets by name, e.g. `{val_seen: [a.csv], val_unseen: [b.csv]}`; each is evaluated and
    logged as `eval/<name>/<metric>`."""
    format: str = "auto"
    """Input format: 'auto' (by extension), 'lucaone_csv', 'seq_label_csv' (both also .tsv), 'fasta', 'fastq', 'swissprot', 'parquet',
    'jsonl'; text formats also compressed (.gz, .bz2, .xz)."""
    fasta_obj_type: str = "auto"
    """Molecule type of FASTA/FASTQ records: 'auto' (detected per record), 'gene', 'prot'."""
    bad_records: str = "fail"
    """Malformed records: 'fail' (stop, naming file and line) or 'skip' (count them into rejects.jsonl)."""
    duplicates: str = "keep"
    """Records sharing an obj_id: 'keep' (train every copy, with a warning naming them), 'drop' (keep the
    first, drop later copies), 'fail' (stop, naming both records)."""
    cache_dir: str = "~/.cache/lucatrain/prepared"
    """Where raw inputs are prepared on the fly (keyed by their fingerprint, reused across runs)."""
    prepare_workers: int = 0
    """Processes preparing raw inputs in parallel (0 = auto: one for inputs under 16 MB, else one per CPU).
    An interrupted preparation restarted reuses the shards it finished."""
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
        from lucatrain.data.sources import formats

        _check_choice("data.format", self.format, ("auto", *formats()))
        _check_choice("data.fasta_obj_type", self.fasta_obj_type, ("auto", "gene", "prot"))
        _check_choice("data.bad_records", self.bad_records, ("fail", "skip"))
        _check_choice("data.duplicates", self.duplicates, ("keep", "drop", "fail"))
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
        _check_positive("data.prepare_workers", self.prepare_workers, allow_zero=True)
        for name, files in self.dev_splits.items():
            if name == "dev" and self.dev_files:
                raise ConfigError("`data.dev_splits.dev`: the name 'dev' is taken by `data.dev_files`; choose another")
            if not name or "/" in name:
                raise ConfigError(f"`data.dev_splits`: a split name must be non-empty and without '/' (it prefixes metric names), got {name!r}")
            if not files:
                raise ConfigError(f"`data.dev_splits.{name}` lists no files")


@dataclass
class ModelConfig:
    model_type: str = "lucaone_gplm"
    """Model family (registry name, `lucatrain.families`): 'lucaone_gplm' (LucaOne/LucaVirus masked-LM
    pretraining with its span, sequence and structure tasks) or 'seq_finetune' (a sequence-level label
    on a pretrained encoder, as LucaOne's downstream tasks)."""
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
        from lucatrain.families import family_names

        _check_choice("model.model_type", self.model_type, family_names())


@dataclass
class LoggerConfig:
    tensorboard: bool = True
    """Write TensorBoard scalars to <output_dir>/tensorboard."""
    level: str = "INFO"
    """Log level of logs/training.log and the console."""
    wandb_project: str = ""
    """Also log every scalar to Weights & Biases under this project (CLIBD's wandb_project_name); empty:
    no wandb. Offline (`WANDB_MODE=offline`) the run is written under <output_dir>/wandb, for
    `wandb sync` later. A resumed run continues the same wandb run."""
    wandb_name: str = ""
    """The wandb run's name (default: the run directory's name)."""

    def validate(self) -> None:
        _check_choice("logger.level", self.level, ("DEBUG", "INFO", "WARNING", "ERROR"))
        if self.wandb_project:
            import importlib.util

            if importlib.util.find_spec("wandb") is None:
                raise ConfigError(f"`logger.wandb_project={self.wandb_project}` needs wandb (`pip install wandb`), which is not installed")


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
        import torch

        if self.precision == "fp16" and not torch.cuda.is_available():
            raise ConfigError("`deepspeed.precision=fp16` needs a CUDA device (DeepSpeed's CPU accelerator has no fp16 "
                              "kernels); on this machine choose fp32 or bf16")  # fmt: skip
        from lucatrain.engine import SHIPPED_DS_CONFIGS, resolve_ds_config_path

        try:
            resolve_ds_config_path(self.config)
        except FileNotFoundError as err:
            raise ConfigError(
                f"`deepspeed.config`: {err}; shipped configs are {list(SHIPPED_DS_CONFIGS)}"
            ) from None


# ----------------------------------------------------------------------------- family sections

FAMILY_SECTIONS: dict[str, type] = {}
"""Config sections that model families add (`register_section`), e.g. `tasks` (LucaOne's task
selection) or `finetune`; parsed and type-checked like the core sections."""


def register_section(name: str, cls: type) -> type:
    """Add a config section (a dataclass with a `validate()` method) under `name`."""
    if name in FAMILY_SECTIONS and FAMILY_SECTIONS[name] is not cls:
        raise ValueError(f"config section `{name}` is registered twice")
    FAMILY_SECTIONS[name] = cls
    return cls


@dataclass
class Config:
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    bnb: BnbConfig = field(default_factory=BnbConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    sections: dict = field(default_factory=dict)
    """The family sections (FAMILY_SECTIONS), by name; also reachable as attributes (`cfg.tasks`)."""

    def __post_init__(self):
        _load_families()
        for name, cls in FAMILY_SECTIONS.items():
            self.sections.setdefault(name, cls())

    def __getattr__(self, name: str):
        sections = self.__dict__.get("sections", {})
        if name in sections:
            return sections[name]
        raise AttributeError(f"Config has no section {name!r}")

    def validate(self) -> "Config":
        for section in dataclasses.fields(self):
            if section.name != "sections":
                getattr(self, section.name).validate()
        if self.data.max_length > self.model.max_position_embeddings:
            raise ConfigError(
                f"`data.max_length` ({self.data.max_length}) exceeds `model.max_position_embeddings` "
                f"({self.model.max_position_embeddings})"
            )
        from lucatrain.families import get_family

        # Every family section is checked, the selected family's and the others' (a typo in a section
        # this run does not read is still a typo), then the selected family's cross-section rules.
        for section in self.sections.values():
            section.validate()
        get_family(self.model.model_type).check_config(self)
        return self

    def to_dict(self) -> dict:
        out = {f.name: dataclasses.asdict(getattr(self, f.name)) for f in dataclasses.fields(self) if f.name != "sections"}
        out.update({name: dataclasses.asdict(section) for name, section in self.sections.items()})
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")


CORE_SECTIONS = [f.name for f in dataclasses.fields(Config) if f.name != "sections"]

PRIMARY_SPLIT = "dev"  # `data.dev_files`, logged as eval/<metric>; named splits log as eval/<name>/<metric>


def dev_inputs(cfg: Config) -> dict[str, list[str]]:
    """Dev split name -> input files: `data.dev_files` as 'dev', then `data.dev_splits` by name."""
    splits = {PRIMARY_SPLIT: cfg.data.dev_files} if cfg.data.dev_files else {}
    splits.update(cfg.data.dev_splits)  # names checked by DataConfig.validate
    return splits


def _load_families() -> None:
    """Import the built-in families, which register their config sections."""
    import lucatrain.families  # noqa: F401


def section_names() -> list[str]:
    _load_families()
    return CORE_SECTIONS + list(FAMILY_SECTIONS)


# ----------------------------------------------------------------------------- loading


def _coerce(key: str, value: Any, kind) -> Any:
    """Check `value` against a field's type (resolved with typing.get_type_hints) and convert it.

    Lists and dicts are checked element by element (`list[int]` holds ints, `dict[str, float]`
    floats), and a dataclass-typed field is a nested section with keys of its own.
    """
    origin = typing.get_origin(kind)
    if kind is Any:
        return value
    if kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"`{key}` must be true or false, got {value!r}")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"`{key}` must be an integer, got {value!r}")
        return value
    if kind is float:
        if isinstance(value, str):  # YAML 1.1 reads `1e-4` (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"`{key}` must be a number, got {value!r}")
        return float(value)
    if kind is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"`{key}` must be a string, got {value!r}")
        return str(value)
    if origin is list:
        (item,) = typing.get_args(kind) or (Any,)
        if isinstance(value, str):  # `a,b` (or `a, b`) on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
            if item is not str:
                value = [yaml.safe_load(v) for v in value]
        if not isinstance(value, list):
            raise ConfigError(f"`{key}` must be a list, got {value!r}")
        return [_coerce(f"{key}[{i}]", v, item) for i, v in enumerate(value)]
    if origin is dict:
        key_kind, item = typing.get_args(kind) or (str, Any)
        if not isinstance(value, dict):
            raise ConfigError(f"`{key}` must be a mapping, got {value!r}")
        return {_coerce(f"{key} (a key)", k, key_kind): _coerce(f"{key}.{k}", v, item) for k, v in value.items()}
    if dataclasses.is_dataclass(kind):
        return _dataclass_from_dict(key, kind, value)
    raise AssertionError(f"unhandled type {kind} for {key}")


def _dataclass_from_dict(key: str, cls: type, values: Any) -> Any:
    """A section (or nested section) dataclass from a mapping; unknown keys name the valid ones."""
    if not isinstance(values, dict):
        raise ConfigError(f"`{key}` must be a mapping of keys, got {values!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    section = cls()
    for name, value in values.items():
        if name not in names:
            raise ConfigError(f"unknown config key `{key}.{name}`; valid keys in `{key}` are {sorted(names)}")
        setattr(section, name, _coerce(f"{key}.{name}", value, hints[name]))
    return section


def _merge(base: dict, key: str, value: Any) -> None:
    """Set dotted `key` inside nested dict `base`; dict values below the section level merge."""
    parts = key.split(".")
    if len(parts) < 2:
        raise ConfigError(f"override `{key}` must be `section.key=value`; sections are {section_names()}")
    node = base
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override `{key}`: `{part}` is not a section")
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """'train.max_steps=10' -> ('train.max_steps', 10); the value is parsed as a YAML scalar."""
    if "=" not in text:
        hint = ""
        if text.startswith("--"):  # LucaOne-style flags
            hint = f"; lucatrain takes `section.key=value`, e.g. `train.{text.lstrip('-')}=...`"
        raise ConfigError(f"override {text!r} must look like `section.key=value`{hint}")
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
            raise ConfigError(f"{path}: a recipe must be a mapping of sections {section_names()}")
    for text in overrides or []:
        _merge(raw, *parse_override(text))
    valid = section_names()
    for name in raw:
        if name not in valid:
            raise ConfigError(f"unknown config section `{name}`; valid sections are {valid}")
    hints = typing.get_type_hints(Config)
    core = {name: _dataclass_from_dict(name, hints[name], raw.get(name, {})) for name in CORE_SECTIONS}
    families = {name: _dataclass_from_dict(name, cls, raw.get(name, {})) for name, cls in FAMILY_SECTIONS.items()}
    return Config(**core, sections=families).validate()


RECIPE_DIR = Path(__file__).with_name("configs")


def shipped_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def _shipped_recipe(name: str) -> Path:
    stem = Path(name).name.removesuffix(".yaml")
    path = RECIPE_DIR / f"{stem}.yaml"
    if not path.is_file():
        raise ConfigError(f"config file {name!r} not found; shipped recipes are {shipped_recipes()}")
    return path
