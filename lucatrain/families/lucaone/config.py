"""The `tasks` config section: which LucaOne/LucaVirus tasks a run trains, their heads and masking."""

from __future__ import annotations

from dataclasses import dataclass, field

from lucatrain.config import ConfigError
from lucatrain.families.lucaone.specs import TASK_NAMES, resolve_modes, select_tasks


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
        return select_tasks(self.level_types, self.names)

    def validate(self) -> None:
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
