"""Registry of model families: `config.task` names one; a new paper adds a line here, never a trainer edit."""
from __future__ import annotations

import importlib

from medjax.errors import MedjaxInputError

TASKS = {
    "mrm": "medjax.tasks.mrm:MRMTask",
    "mrm_mae": "medjax.tasks.mrm_mae:MRMMAETask",
    "fundus_classification": "medjax.tasks.fundus_classification:FundusClassificationTask",
    "fundus_multilabel": "medjax.tasks.fundus_multilabel:FundusMultiLabelTask",
    "fundus_segmentation": "medjax.tasks.fundus_segmentation:FundusSegmentationTask",
    "universal": "medjax.tasks.universal:UniversalTask",
    "uni_pretrain": "medjax.tasks.uni_pretrain:UNIPretrainTask",
    "ptunifier": "medjax.tasks.ptunifier:PTUnifierTask",
    "ptunifier_vqa": "medjax.tasks.ptunifier_vqa:PTUnifierVQATask",
    "ptunifier_classification": "medjax.tasks.ptunifier_classification:PTUnifierClassificationTask",
    "ptunifier_retrieval": "medjax.tasks.ptunifier_retrieval:PTUnifierRetrievalTask",
    "ptunifier_nli": "medjax.tasks.ptunifier_nli:PTUnifierNLITask",
    "ptunifier_melinda": "medjax.tasks.ptunifier_melinda:PTUnifierMelindaTask",
    "ptunifier_reportgen": "medjax.tasks.ptunifier_reportgen:PTUnifierReportGenTask",
    "unimedi": "medjax.tasks.unimedi:UniMedITask",
    "pathchat": "medjax.tasks.pathchat:PathChatTask",
    "fvlm": "medjax.tasks.fvlm:FVLMTask",
    "visd": "medjax.tasks.visd:ViSDTask",
}


def task_class(name: str):
    """The registered TaskBase subclass called `name` (a config's `task`)."""
    if name not in TASKS:
        raise MedjaxInputError(f"config.task: unknown task {name!r}; registered: {sorted(TASKS)}")
    module_name, class_name = TASKS[name].split(":")
    return getattr(importlib.import_module(module_name), class_name)


def build_task(config, **kwargs):
    """Instantiate the task named by `config.task` with the config (and e.g. `log=`, `run=`)."""
    return task_class(config.task)(config, **kwargs)
