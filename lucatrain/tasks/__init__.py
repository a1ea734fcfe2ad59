"""Pretraining tasks. A Task is an `nn.Module` that owns the encoder and its heads and returns
`(loss, report)` from `forward(batch, totals)`, so the trainer never branches on task or modality.
"""

from lucatrain.tasks.mlm import MLM_TASKS, MaskedLMTask

# Every task name a config may select, mapped to the Task class that implements it.
TASK_REGISTRY = {name: MaskedLMTask for name in MLM_TASKS}
TASK_NAMES = tuple(TASK_REGISTRY)


def build_task(model, task_names, weights):
    """The Task module for `task_names` (all must be served by one Task class today)."""
    unknown = [n for n in task_names if n not in TASK_REGISTRY]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}; valid tasks are {list(TASK_NAMES)}")
    classes = {TASK_REGISTRY[n] for n in task_names}
    assert len(classes) == 1, "mixing task families arrives with the multi-task heads"
    return classes.pop()(model, list(task_names), dict(weights))
