"""The pretraining task table: names, levels, label layout, loss kind and default weight.

One row per LucaOne/LucaVirus task. Everything that needs to know "what is task X" reads it here:
config validation and selection, label validation at prepare time, label encoding at collate time,
and the heads. This module imports neither torch nor the data code, so all of those can use it.

Label layout in the LucaOne CSV (`obj_label` column, a JSON object or Python dict literal):

    {"span_level":      {"prot_site": [[start, end, index], ...], ...},   0-based residues, inclusive
     "seq_level":       {"gene_taxonomy": index, "prot_keyword": [index, ...], ...},
     "structure_level": {"prot_structure": [[x, y, z] | null | -1, ...]}}  one entry per residue

A task key that is absent (or null) means "this record has no label for the task": the record adds
nothing to that task's loss. `index` is a 0-based line number in `label/<task>.txt` after its
`label` header line. null or -1 for a residue's coordinates means "no coordinates" (LucaOne writes
-1 for residues missing from the structure).

Table order is the order of LucaOne's head lists (`hidden_layer_list.<i>`, `classifier_list.<i>`):
span-level tasks, then seq-level, then structure-level, as LucaOne's argument checking builds them.
"""

from __future__ import annotations

from dataclasses import dataclass

GENE, PROT = 0, 1  # = lucatrain.data.alphabet.GENE / PROT (token_type_ids)

LEVELS = ("token_level", "span_level", "seq_level", "structure_level")
ALL_LEVELS = "all"

# Output modes: how a task's head output is scored.
MLM = "mlm"  # the tied LM head over the vocabulary, masked positions only
MULTI_CLASS = "multi_class"  # softmax cross-entropy over the label file's classes
MULTI_LABEL = "multi_label"  # one sigmoid per label, BCE over *every* label (unlisted = negative)
REGRESSION = "regression"  # x, y, z per residue, L1

# Loss types per output mode (`tasks.loss_types`); the first is LucaOne's and the default.
LOSS_TYPES = {MLM: ("cce",), MULTI_CLASS: ("cce",), MULTI_LABEL: ("bce",), REGRESSION: ("l1", "l2", "smooth_l1")}
METRICS = {MLM: ("loss", "acc"), MULTI_CLASS: ("loss", "acc"), MULTI_LABEL: ("loss", "micro_f1", "macro_f1"),
           REGRESSION: ("loss", "mae")}  # fmt: skip


@dataclass(frozen=True)
class TaskSpec:
    name: str
    level: str  # one of LEVELS
    obj_type: int  # the molecule whose records carry this task (GENE or PROT)
    output_mode: str  # MLM, MULTI_CLASS, MULTI_LABEL or REGRESSION
    default_weight: float  # the loss weights of the LucaOne v2.0 / LucaVirus v1.0 run scripts
    default_classifier_size: int = 0  # hidden width of the head, as in those scripts (0: no head)

    @property
    def has_head(self) -> bool:
        """A label task with a head of its own (all but the masked-LM tasks, which share the LM head)."""
        return self.output_mode != MLM

    @property
    def has_label_file(self) -> bool:
        return self.output_mode in (MULTI_CLASS, MULTI_LABEL)

    @property
    def output_modes(self) -> tuple[str, ...]:
        """Output modes `tasks.output_modes` may choose: a sequence-level classification task may be
        multi-class (one index per record) or multi-label (a list of indices); others are fixed."""
        if self.level == "seq_level" and self.output_mode in (MULTI_CLASS, MULTI_LABEL):
            return (MULTI_CLASS, MULTI_LABEL)
        return (self.output_mode,)

    @property
    def per_token(self) -> bool:
        """Scored on residue tokens (span, structure) rather than on the [CLS] vector."""
        return self.level in ("span_level", "structure_level")


TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        TaskSpec("gene_mask", "token_level", GENE, MLM, 1.0),
        TaskSpec("prot_mask", "token_level", PROT, MLM, 1.0),
        TaskSpec("gene_type", "span_level", GENE, MULTI_CLASS, 0.2, 128),
        TaskSpec("prot_homo", "span_level", PROT, MULTI_CLASS, 0.2, 4096),
        TaskSpec("prot_site", "span_level", PROT, MULTI_CLASS, 0.2, 1024),
        TaskSpec("prot_domain", "span_level", PROT, MULTI_CLASS, 0.2, 10240),
        TaskSpec("gene_taxonomy", "seq_level", GENE, MULTI_CLASS, 0.2, 2048),
        TaskSpec("prot_taxonomy", "seq_level", PROT, MULTI_CLASS, 0.2, 2048),
        TaskSpec("prot_keyword", "seq_level", PROT, MULTI_LABEL, 1.0, 2048),
        TaskSpec("prot_structure", "structure_level", PROT, REGRESSION, 1.0, 128),
    )
}
TASK_NAMES: tuple[str, ...] = tuple(TASKS)


def select_tasks(level_types, names) -> list[str]:
    """LucaOne's selection: `pretrain_task_level_type` x `pretrain_task_level_name`.

    level_types: levels to train ("all" = every level). names: task names; empty = every task of
    the chosen levels. Raises ValueError naming the bad value and listing the valid ones. Returns
    the selected names in table order (so heads and reports have one fixed order on every rank).
    """
    level_types = [str(t) for t in level_types]
    for level in level_types:
        if level != ALL_LEVELS and level not in LEVELS:
            raise ValueError(f"unknown task level type {level!r}; valid ones are {[*LEVELS, ALL_LEVELS]}")
    levels = set(LEVELS) if ALL_LEVELS in level_types or not level_types else set(level_types)
    for name in names:
        if name not in TASKS:
            raise ValueError(f"unknown task {name!r}; valid tasks are {list(TASK_NAMES)}")
        if TASKS[name].level not in levels:
            raise ValueError(
                f"task {name!r} is {TASKS[name].level}, which is not among the selected level types "
                f"{sorted(levels)}; add it to the level types or remove the task"
            )
    chosen = set(names) if names else {n for n, spec in TASKS.items() if spec.level in levels}
    return [n for n in TASK_NAMES if n in chosen]


def resolve_modes(names, output_modes: dict | None, loss_types: dict | None) -> tuple[dict, dict]:
    """(task -> output mode, task -> loss type) for `names`: the table's, overridden by the config's.
    Raises ValueError for a mode or loss type the task cannot take."""
    modes, losses = {}, {}
    for name in names:
        spec = TASKS[name]
        modes[name] = (output_modes or {}).get(name, spec.output_mode)
        if modes[name] not in spec.output_modes:
            raise ValueError(f"`tasks.output_modes.{name}`: {modes[name]!r} is not possible; choose from {list(spec.output_modes)}")
        losses[name] = (loss_types or {}).get(name, LOSS_TYPES[modes[name]][0])
        if losses[name] not in LOSS_TYPES[modes[name]]:
            raise ValueError(f"`tasks.loss_types.{name}`: {losses[name]!r} does not fit a {modes[name]} task; "
                             f"choose from {list(LOSS_TYPES[modes[name]])}")  # fmt: skip
    return modes, losses
