"""Plain dict registries of tasks and methods.

Tasks are imported lazily (``"module:Class"``) so that ``--task vision`` never imports TextAttack.
"""

from __future__ import annotations

import importlib

from .errors import lookup

TASKS: dict[str, str] = {
    "vision": "samat.vision.task:VisionTask",
    "text": "samat.text.task:TextTask",
    "segmentation": "samat.segmentation.task:SegmentationTask",
}


def task_class(name: str):
    """The Task subclass registered as ``name``; ``UsageError`` listing the valid names otherwise."""
    module_name, _, class_name = lookup(TASKS, "task", name).partition(":")
    return getattr(importlib.import_module(module_name), class_name)
