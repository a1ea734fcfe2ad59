"""The LucaOne/LucaVirus family (`model.model_type=lucaone_gplm`): masked-LM pretraining of the
gene/protein encoder with LucaOne's span-, sequence- and structure-level tasks.

`specs` is the task table, `plan` decides which tasks a run trains and with how many labels,
`labels` checks and encodes task labels, `task` computes the losses, `family` wires them into the
trainer.
"""

from lucatrain.families.lucaone.specs import LEVELS, TASK_NAMES, TASKS, select_tasks
from lucatrain.families.lucaone.task import PretrainTask, metrics_from_sums
from lucatrain.families.lucaone.family import LUCAONE_RECIPE, LucaOneFamily, build_task
from lucatrain.models.encoder import build_model

__all__ = ["LEVELS", "LUCAONE_RECIPE", "TASKS", "TASK_NAMES", "LucaOneFamily", "PretrainTask", "build_model", "build_task",
           "metrics_from_sums", "select_tasks"]
