"""samat: Sharpness-Aware Minimization vs Adversarial Training, on any Hugging Face model and dataset.

The repository's top-level folders install as one namespaced package (see ``pyproject.toml``):

- ``samat.common``: the engine (SAM update rule, one PGD over an attack surface, methods, the training loop,
  evaluation, checkpoints, results);
- ``samat.vision``, ``samat.text``, ``samat.segmentation``: the tasks, each a plug-in of the engine;
- ``samat.analysis``: what only reads results (runs -> tables -> figures -> report) and the toy model;
- ``samat.scripts``: the command lines, also reachable as ``samat <command>``.
"""

__version__ = "0.1.0"
