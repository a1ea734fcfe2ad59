"""Which tasks a run trains, and with how many labels: decided once at start-up, before any compute.

Inputs are the config's selection, the label files, and the per-task label statistics `prepare`
stored for the train and dev data. Outcomes:
- a selected task whose labels no training record carries is dropped, with the reason logged
  (the shipped sample has no gene_type or prot_homo labels, yet the LucaVirus script selects them);
- a label index past the end of its label file stops the run, naming the file and the index;
- records of a molecule no trained task scores are left out of the epoch (a protein-only run on a
  mixed dataset trains on the proteins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lucatrain.families.lucaone.labels import LabelStats, read_label_file
from lucatrain.families.lucaone.specs import MULTI_CLASS, TASKS, resolve_modes


@dataclass
class TaskPlan:
    names: list[str]
    """Tasks trained, in table order."""
    num_labels: dict[str, int] = field(default_factory=dict)
    """Label count per task with a label file (the head's output size)."""
    label_names: dict[str, list[str]] = field(default_factory=dict)
    """Label names per task with a label file (exported beside the heads)."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Selected tasks not trained -> why."""
    unknown_label_keys: list[str] = field(default_factory=list)
    """Label entries in the data that name no task (e.g. a typo such as seq_level.prot_keywords)."""
    output_modes: dict[str, str] = field(default_factory=dict)
    """Output mode per trained task (the table's unless `tasks.output_modes` says otherwise)."""

    @property
    def obj_types(self) -> list[int]:
        """Molecule types (GENE, PROT) that at least one trained task scores."""
        return sorted({TASKS[n].obj_type for n in self.names})

    @property
    def label_tasks(self) -> list[str]:
        return [n for n in self.names if TASKS[n].has_head]


def default_label_dir(train_files) -> Path | None:
    """LucaOne's layout <dataset>/{train,dev,label}: the `label/` beside the first train input's directory."""
    if not train_files:
        return None
    first = Path(train_files[0])
    for base in (first.parent, first.parent.parent) if first.is_file() else (first, first.parent):
        if (base / "label").is_dir():
            return base / "label"
    return None


def plan_tasks(selected: list[str], label_dir: str, train_files, train_stats: LabelStats,
               dev_stats: LabelStats | None = None, output_modes: dict[str, str] | None = None) -> TaskPlan:  # fmt: skip
    """The TaskPlan for `selected` tasks; raises ValueError naming the file or task that is wrong."""
    plan = TaskPlan(names=[], unknown_label_keys=train_stats.unknown_keys())
    for name in selected:
        if TASKS[name].has_head and train_stats.records(name) == 0:
            plan.dropped[name] = f"no training record carries a {TASKS[name].level}.{name} label"
        else:
            plan.names.append(name)
    if not plan.names:
        raise ValueError(f"none of the selected tasks can be trained: {plan.dropped}")
    plan.output_modes = resolve_modes(plan.names, output_modes, None)[0]
    for name, mode in plan.output_modes.items():
        for which, stats in (("training", train_stats), ("dev", dev_stats)):
            if mode == MULTI_CLASS and stats is not None and stats.lists(name):
                raise ValueError(
                    f"{name} is multi_class (one label index per record) but {stats.lists(name)} {which} records give "
                    f"a list of indices; set `tasks.output_modes.{name}=multi_label` or fix the labels"
                )

    needs_files = [n for n in plan.names if TASKS[n].has_label_file]
    if not needs_files:
        return plan
    directory = Path(label_dir).expanduser() if label_dir else default_label_dir(train_files)
    if directory is None or not directory.is_dir():
        where = f"`tasks.label_dir` = {label_dir}" if label_dir else "no label/ directory beside the train files"
        raise ValueError(f"tasks {needs_files} need label files <task>.txt, but {where}; set `tasks.label_dir`")
    for name in needs_files:
        path = directory / f"{name}.txt"
        names = read_label_file(path)
        plan.label_names[name] = names
        plan.num_labels[name] = len(names)
        for which, stats in (("training", train_stats), ("dev", dev_stats)):
            if stats is not None and stats.max_index(name) >= len(names):
                raise ValueError(
                    f"the {which} data uses label index {stats.max_index(name)} for {name}, but {path} holds "
                    f"{len(names)} labels (indices 0..{len(names) - 1}, counted after the header line)"
                )
    return plan
