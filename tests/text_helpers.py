"""Tiny text fixtures built in the test: a word-level BERT tokenizer, a 2-layer BERT (hidden 32) and a
sentiment-like DatasetDict, saved as a ``from_pretrained`` folder and a ``save_to_disk`` folder."""

from __future__ import annotations

import random
from pathlib import Path

POSITIVE = ["good", "great", "fine", "excellent", "wonderful", "superb", "lovely", "pleasant", "brilliant",
            "delightful", "charming", "solid", "smart", "warm", "funny", "moving"]
NEGATIVE = ["bad", "awful", "poor", "terrible", "boring", "dull", "weak", "stupid", "ugly", "tedious", "bland",
            "clumsy", "silly", "flat", "messy", "lazy"]
FILLER = ["the", "a", "movie", "film", "story", "plot", "actor", "cast", "is", "was", "very", "really", "and",
          "but", "quite", "script", "ending", "music", "scene", "director", "work", "this", "that", "it", "with",
          "of", "acting", "camera", "dialogue", "pace", "score", "drama", "comedy", "role", "hero", "star"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def tiny_tokenizer(folder: Path):
    from transformers import BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(SPECIAL + sorted(set(POSITIVE + NEGATIVE + FILLER + [".", ","]))) + "\n")
    return BertTokenizerFast(vocab_file=str(vocab), do_lower_case=True, model_max_length=64)


def tiny_bert(vocab_size: int, num_labels: int = 2, seed: int = 0):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=num_labels,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(config).eval()


def sentence(rng: random.Random, label: int) -> str:
    words = rng.sample(FILLER, rng.randint(2, 8)) + [rng.choice(POSITIVE if label else NEGATIVE)]
    rng.shuffle(words)
    return " ".join(words) + " ."


def tiny_dataset(folder: Path, n_train: int = 48, n_test: int = 16, seed: int = 0, pairs: bool = False) -> Path:
    """A DatasetDict (train/test) with ``sentence``/``label`` columns (``sentence1``/``sentence2`` for pairs),
    saved with ``save_to_disk``."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

    rng = random.Random(seed)

    def split(n: int) -> Dataset:
        labels = [i % 2 for i in range(n)]
        if pairs:
            cols = {"sentence1": [sentence(rng, y) for y in labels], "sentence2": [sentence(rng, y) for y in labels]}
        else:
            cols = {"sentence": [sentence(rng, y) for y in labels]}
        feats = Features({**{k: Value("string") for k in cols}, "label": ClassLabel(names=["neg", "pos"])})
        return Dataset.from_dict({**cols, "label": labels}, features=feats)

    DatasetDict(train=split(n_train), test=split(n_test)).save_to_disk(str(folder))
    return folder


def tiny_checkpoint(folder: Path, num_labels: int = 2, classifier: bool = True) -> Path:
    """A ``from_pretrained`` folder with the tiny BERT and its tokenizer. ``classifier=False`` saves the bare
    encoder (``BertModel``), as a pretrained hub model would be."""
    tokenizer = tiny_tokenizer(folder)
    model = tiny_bert(tokenizer.vocab_size, num_labels)
    (model if classifier else model.bert).save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return folder


def run_args(**overrides):
    """``RunArgs`` for ``--task text`` (only what ``TextTask.build`` reads matters here)."""
    from samat.common.config import RunArgs

    return RunArgs(task="text", **overrides)
