"""samat: Sharpness-Aware Minimization vs Adversarial Training, on any Hugging Face model and dataset.

The repository's top-level folders install as one namespaced package (see ``pyproject.toml``):

- ``samat.common``: the engine (SAM update rule, one PGD over an attack surface, methods, the training loop,
  evaluation, checkpoints, results);
- ``samat.vision``, ``samat.text``, ``samat.segmentation``: the tasks, each a plug-in of the engine;
- ``samat.analysis``: what only reads results (runs -> tables -> figures -> report) and the toy model;
- ``samat.scripts``: the command lines, also reachable as ``samat <command>``.
"""

__version__ = "0.1.0"

# The public API for the user's own training code, imported on first use so that ``import samat`` stays light
# (no torch, no transformers): name -> module under samat.
_LAZY = {
    "SAM": "samat.common.optim",            # a torch optimizer around any base optimizer
    "SAMTrainer": "samat.common.hf_trainer",  # a transformers.Trainer with SAM / embedding-space AT
    "SAMArguments": "samat.common.api",     # the method and its hyper-parameters, for SAMTrainer and step
    "step": "samat.common.api",             # one SAM / AT step in the user's own Accelerate loop
    "evaluate_model": "samat.common.api",   # robustness of an in-memory model, the record `samat evaluate` writes
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'samat' has no attribute {name!r}")
