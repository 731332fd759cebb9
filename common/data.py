"""Data helpers every task shares: splits, columns, and augmentation randomness that survives a resume."""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
from torch.utils.data import Sampler, Subset

from .errors import UsageError


def pick_split(splits: Sequence[str], wanted: Optional[str], fallbacks: Sequence[str], flag: str) -> str:
    """``wanted`` if the dataset has it, else the first of ``fallbacks`` it has; ``UsageError`` listing the
    dataset's splits otherwise."""
    names = list(splits)
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"{flag}: split {wanted!r} not in the dataset; choose one of: {', '.join(names)}")
        return wanted
    for name in fallbacks:
        if name in names:
            return name
    raise UsageError(f"{flag}: the dataset has no {' or '.join(fallbacks)} split; choose one of: "
                     f"{', '.join(names)}")


def find_column(columns: Sequence[str], wanted: Optional[str], candidates: Sequence[str], what: str,
                flag: str, typed: Sequence[str] = ()) -> str:
    """The column named by ``flag`` (``wanted``), else the first of ``candidates`` present, else the first
    of ``typed`` (columns found by feature type); ``UsageError`` listing the columns otherwise."""
    names = list(columns)
    if wanted is not None:
        if wanted not in names:
            raise UsageError(f"{flag}: no column {wanted!r}; the dataset has: {', '.join(names)}")
        return wanted
    for name in [*candidates, *typed]:
        if name in names:
            return name
    raise UsageError(f"cannot find the {what} column among {', '.join(names)}; name it with {flag}")


def example_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """A generator for one example's augmentation in one epoch.

    Augmentation must not draw from the global RNG: Accelerate's loader fetches one batch ahead, so after a
    resume the draws would interleave differently with the training step's (attacks, dropout). Seeding per
    ``(seed, epoch, index)`` gives a resumed run the very same images, with any number of workers.
    """
    mixed = (seed * 1_000_003 + epoch * 998_244_353 + index * 2_654_435_761) % (2 ** 63 - 1)
    return torch.Generator().manual_seed(mixed)


def seeded_subset(dataset: Any, n: int, seed: int) -> Any:
    """The first ``n`` examples of a seeded permutation, in their original order (all when ``n`` is 0 or at
    least the set's size). The run's subsets are :func:`train_subset` and :func:`eval_subset`."""
    if not n or n >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:n].tolist()
    if hasattr(dataset, "select"):
        return dataset.select(sorted(order))
    return Subset(dataset, sorted(order))


def train_subset(dataset: Any, run: Any) -> Any:
    """The run's training subset: ``run.max_train_samples`` examples (0: all) drawn with ``run.seed``."""
    return seeded_subset(dataset, run.max_train_samples, run.seed)


def eval_subset(dataset: Any, run: Any) -> Any:
    """The run's evaluation subset: ``run.max_eval_samples`` examples (0: all) drawn with ``run.seed + 1``, so
    that it is not the same permutation as the training subset's. The engine's evaluation and a task that
    evaluates on its own (e.g. segmentation's pictures) both call this, and so see the very same examples."""
    return seeded_subset(dataset, run.max_eval_samples, run.seed + 1)


def dataset_labels(dataset: Any) -> Optional[torch.Tensor]:
    """The class labels of a classification dataset, ``(N,)`` int64, read without loading its inputs (the
    divergence guard's label prior); ``None`` when the dataset does not say (e.g. segmentation masks).

    Understands ``Subset`` (of anything below), a ``datasets.Dataset`` with a ``labels`` or ``label`` column,
    and any dataset with a ``labels()`` method (vision's ``ImageClassification``)."""
    if isinstance(dataset, Subset):
        inner = dataset_labels(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    own = getattr(dataset, "labels", None)
    if callable(own):
        return own()
    names = getattr(dataset, "column_names", None) or []
    for column in ("labels", "label"):
        if column in names:
            values = dataset[column]
            if len(values) and not isinstance(values[0], (int, bool)) and not hasattr(values[0], "__index__"):
                return None  # a mask or a list per example: not one class per example
            return torch.as_tensor(list(values), dtype=torch.long)
    return None


def example_lengths(dataset: Any) -> Optional[torch.Tensor]:
    """Each example's length, ``(N,)`` int64 (e.g. tokens per sentence), when the dataset can tell it without
    loading its inputs: a ``lengths()`` method (text's ``TokenizedText``), or a ``Subset`` of such a dataset;
    ``None`` otherwise (fixed-size inputs such as images have nothing to group)."""
    if isinstance(dataset, Subset):
        inner = example_lengths(dataset.dataset)
        return None if inner is None else inner[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    own = getattr(dataset, "lengths", None)
    return torch.as_tensor(own(), dtype=torch.long) if callable(own) else None


class LengthGroupedBatches(Sampler):
    """A fixed batch sampler over positions ``0..N-1`` that puts examples of similar length in one batch, so
    a padded batch carries few padding tokens (evaluation only: nothing is shuffled).

    The positions are sorted by length (longest first, ties in position order) and cut into batches of
    ``batch_size`` (the last one may be smaller, like ``BatchSampler(drop_last=False)``, which is what
    Accelerate's ``BatchSamplerShard`` and ``gather_for_metrics`` assume). The batches are then put in a fixed
    order drawn with ``seed``, so that the first batches (the masking diagnostics' subset) span lengths
    instead of being all the longest. Every position is in exactly one batch; the order is the same on every
    pass and in every process. ``lengths``: ``(N,)`` int."""

    def __init__(self, lengths: torch.Tensor, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        lengths = torch.as_tensor(lengths, dtype=torch.long)
        order = torch.sort(-lengths, stable=True).indices
        batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
        full, last = (batches[:-1], batches[-1:]) if batches and len(batches[-1]) < batch_size else (batches, [])
        shuffled = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed)).tolist()
        self.batches = [full[i] for i in shuffled] + last  # the short batch stays last (see above)
        self.batch_size = batch_size
        self.drop_last = False

    def __iter__(self):
        return iter([list(batch) for batch in self.batches])

    def __len__(self) -> int:
        return len(self.batches)
