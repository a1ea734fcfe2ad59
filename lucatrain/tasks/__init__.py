"""Pretraining tasks. The Task module (`PretrainTask`) owns the encoder and the task heads and returns
`(loss, report)` from `forward(batch, totals)`, so the trainer never branches on task or modality.

`specs` is the task table, `plan` decides which tasks a run trains and with how many labels,
`pretrain` computes the losses.
"""

from lucatrain.tasks.pretrain import PretrainTask, metrics_from_sums
from lucatrain.tasks.specs import LEVELS, TASK_NAMES, TASKS, select_tasks


def build_task(model, task_names, weights=None, num_labels=None, classifier_sizes=None, classifier_dropout=0.0,
               output_modes=None, loss_types=None):  # fmt: skip
    """The Task module training `task_names` on `model` (heads sized by `num_labels`)."""
    unknown = [n for n in task_names if n not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks are {list(TASK_NAMES)}")
    return PretrainTask(model, task_names, weights, num_labels, classifier_sizes, classifier_dropout, output_modes, loss_types)


__all__ = ["LEVELS", "TASKS", "TASK_NAMES", "PretrainTask", "build_task", "metrics_from_sums", "select_tasks"]
