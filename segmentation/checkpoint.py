"""A saved segmentation model (a run's ``model/`` folder) as a ``--model``: smp's (or transformers')
``save_pretrained`` folder plus ``samat_segmentation.json`` (see :func:`models.save_model`), reloaded with
no training flags, and refused when its classes differ from the data's."""

from __future__ import annotations

from pathlib import Path

from samat.common.errors import UsageError

from . import models


def is_saved(name: str) -> bool:
    """Whether ``name`` is a folder written by :func:`models.save_model`."""
    return (Path(name).expanduser() / models.CONFIG_FILE).is_file()


def load_saved(name: str, num_classes: int) -> models.NormalizedSegmenter:
    """The saved model in ``name``, in train mode (as a freshly built one); ``UsageError`` when it predicts
    another number of classes than ``num_classes``."""
    model = models.load_model(str(Path(name).expanduser()))
    saved = int(model.config.get("num_classes") or len(model.config.get("class_names") or []))
    if saved != num_classes:
        raise UsageError(f"--model {name!r} predicts {saved} classes, but the dataset has {num_classes}; "
                         "evaluate it on the data it was trained for (or pass --dataset/--num_classes)")
    return model.train()
