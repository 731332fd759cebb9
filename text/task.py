"""The text task: sequence classification with perturbations in token-embedding space.

Attack surface (FreeLB-style, Zhu et al. 2020): ``x`` is the word-embedding output of ``input_ids``
``(B, L, D)``; ``delta`` is added to it *before* position/type embeddings and LayerNorm (``inputs_embeds``),
one ball per token (``norm_dims=(-1,)``), padding masked so it never moves. Radii are **relative to the mean
L2 norm of the model's token-embedding rows** (``eps_scale``): ``--train_eps 0.02 --train_norm l2`` lets
each token move by 2 % of a typical embedding's length; for L-inf, ``eps`` bounds each coordinate by that
fraction of the mean norm (an L-inf ball of radius ``e`` reaches ``e * sqrt(D)`` in L2, ~20x for D = 384).

Collapse (measured on Rotten Tomatoes, MiniLM, CPU; numbers and commands in ``bench/README.md``): Madry's
pure adversarial loss, *from the pretrained encoder with a new head*, drifts to the majority class on short
schedules (1,000 sentences, lr 3e-5, 96 steps, L2 2 %: every one of 200 test predictions positive, where ERM
reaches 0.78). Hence the text default ``--at_clean_weight 0.5``: the loss is half clean, half adversarial,
in the spirit of FreeLB, which averages the losses along its K-step ascent path, the first of them at a small
random start next to the clean input. On that short schedule it keeps the model off a single class
(clean 0.71); on the default CPU schedule (2,000 sentences, lr 5e-5) it matches ERM's clean accuracy (0.850
vs 0.845) and raises embedding-PGD robust accuracy (L2 2 %: 0.68 vs 0.61; 5 %: 0.37 vs 0.20), as pure PGD-AT
also does there (0.845; 0.675, 0.425). Larger training radii pushed the pure adversarial loss toward the
majority class again (5 %, from the ERM model: 89 % positive); the engine warns when a model predicts a single class. ``--at_clean_weight 0`` gives Madry's loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor, nn

from samat.common.data import pick_split
from samat.common.errors import UsageError
from samat.common.files import write_json_atomic
from samat.common.classification import ClassificationTask
from samat.common.task import AttackSurface, TaskData

from . import data as text_data
from . import models as text_models
from .recipe import RECIPE

logger = logging.getLogger(__name__)

DEFAULT_RECIPES = ("deepwordbug", "pwws")
# Attack examples: a fixed shuffle of the eval split (not the run's --seed), so that every model of a
# comparison is attacked on the same sentences.
ATTACK_EXAMPLES_SEED = 0
INFO_FILE = "samat_text.json"  # beside a saved model: the data it was trained for


@dataclass
class TextArgs:
    """Flags of ``--task text`` (the dataset, model, label column and splits are common flags)."""

    text_column: Optional[str] = field(
        default=None,
        metadata={"help": "Text column. Default: the first of text, sentence, sentence1, premise, question1, "
                  "question, review, content, document, tweet."},
    )
    text_pair_column: Optional[str] = field(
        default=None,
        metadata={"help": "Second text column for sentence-pair tasks. Default: found for known pairs "
                  "(sentence1/sentence2, premise/hypothesis, question1/question2, question/sentence)."},
    )
    max_length: int = field(
        default=128,
        metadata={"help": "Truncate inputs to this many tokens (special tokens included); must not exceed "
                  "the model's limit. Batches are padded only to their longest input."},
    )
    textattack_recipes: list[str] = field(
        default_factory=lambda: list(DEFAULT_RECIPES),
        metadata={"help": "TextAttack recipes run after training on the eval split ('none' to skip). Offline: "
                  "deepwordbug, pruthi, pwws, embedding-swap (GloVe), embedding-swap-model (the model's "
                  "own input embeddings); with network: textfooler, bae, bert-attack, a2t, ..."},
    )
    textattack_num_examples: Optional[int] = field(
        default=None,
        metadata={"help": "Sentences attacked per recipe (a fixed shuffle of the eval split, the same for "
                  "every model). Default: 500 on a GPU, 30 on CPU."},
    )
    textattack_query_budget: Optional[int] = field(
        default=None, metadata={"help": "Maximum model queries per attacked sentence (default: unlimited)."}
    )
    textattack_batch_size: int = field(
        default=64, metadata={"help": "Sentences per model forward pass while attacking."}
    )


def _recipe_list(values: list[str]) -> list[str]:
    return [] if [v.lower() for v in values] == ["none"] else list(values)


@dataclass(frozen=True)
class TextBuild:
    """What :meth:`TextTask.build` learned that later methods read: the tokenizer (saved beside the model),
    the resolved columns, the eval split as ``text``/``text_pair``/``label`` rows in a fixed shuffled order
    (TextAttack's input) and the data record saved as ``samat_text.json``."""

    tokenizer: Any
    columns: text_data.Columns
    attack_examples: Any
    info: dict


class TextTask(ClassificationTask):
    """Sequence classification (any ``AutoModelForSequenceClassification``) on a text dataset."""

    recipe = RECIPE
    Args: ClassVar[type] = TextArgs

    def __init__(self, args: Optional[TextArgs] = None):
        super().__init__(args or TextArgs())

    # ------------------------------------------------------------------------------------------ build

    def check_args(self) -> None:
        """Flag values, and the TextAttack recipes: unknown or unavailable ones fail now (one line), not
        after an hour of training."""
        args: TextArgs = self.args
        if args.max_length < 2:
            raise UsageError(f"--max_length: {args.max_length} must be >= 2")
        if args.textattack_batch_size < 1:
            raise UsageError(f"--textattack_batch_size: {args.textattack_batch_size} must be >= 1")
        if args.textattack_num_examples is not None and args.textattack_num_examples < 0:
            raise UsageError(f"--textattack_num_examples: {args.textattack_num_examples} must be >= 0")
        recipes = _recipe_list(args.textattack_recipes)
        if recipes:
            from .textattack.recipes import check_recipes

            check_recipes(recipes)

    def build(self, run: Any, accelerator: Any) -> TaskData:
        """Load data and model, check columns/labels/length, tokenise. Runs on every process, under the
        engine's ``accelerator.main_process_first()`` (the main process fills the ``datasets`` cache)."""
        args: TextArgs = self.args
        self.check_args()
        dsd = text_data.load_raw(run.dataset, run.dataset_config)
        pick_split(dsd, run.train_split, ("train",), "--train_split")
        eval_split = pick_split(dsd, run.eval_split, ("test", "validation"), "--eval_split")
        columns = text_data.resolve_columns(dsd, run.train_split, args.text_column, args.text_pair_column,
                                            run.label_column)
        if columns.pair is None and args.text_pair_column is None:
            missing_in_eval = [c for c in (columns.text, columns.label) if c not in dsd[eval_split].column_names]
            if missing_in_eval:
                raise UsageError(f"--eval_split {eval_split!r} lacks column {missing_in_eval[0]!r}")
        text_data.check_labels(dsd, run.train_split, columns)
        text_data.check_labels(dsd, eval_split, columns)

        loaded = text_models.load_classifier(run.model, columns.label_names, args.max_length)

        train_examples = text_data.to_examples(dsd[run.train_split], columns)
        eval_examples = text_data.to_examples(dsd[eval_split], columns)
        # tokenised once, then read out of Arrow once into tensors (text_data.TokenizedText)
        train = text_data.TokenizedText(text_data.tokenize(train_examples, loaded.tokenizer, args.max_length))
        evals = text_data.TokenizedText(text_data.tokenize(eval_examples, loaded.tokenizer, args.max_length))
        scale = embedding_scale(loaded.model)
        info = {
            "dataset": run.dataset or text_data.EMBEDDED_DATASET,
            "dataset_config": run.dataset_config,
            "train_split": run.train_split,
            "eval_split": eval_split,
            "text_column": columns.text,
            "text_pair_column": columns.pair,
            "label_column": columns.label,
            "label_names": columns.label_names,
            "num_classes": len(columns.label_names),
            "model": run.model or text_models.DEFAULT_MODEL,
            "model_source": loaded.source,
            "max_length": args.max_length,
            "eps_unit": f"fraction of the mean token-embedding L2 norm ({scale:.4f} at initialisation), per token",
        }
        collator = text_data.PadCollator(loaded.tokenizer)
        learned = TextBuild(tokenizer=loaded.tokenizer, columns=columns,
                            attack_examples=eval_examples.shuffle(seed=ATTACK_EXAMPLES_SEED), info=info)
        return TaskData(model=loaded.model, train_dataset=train, eval_dataset=evals, collate_fn=collator,
                        info=dict(info), task=self.learned(learned))

    # ---------------------------------------------------------------------------------------- compute

    @staticmethod
    def _model_inputs(batch: dict) -> dict:
        return {k: batch[k] for k in ("attention_mask", "token_type_ids") if k in batch}

    def forward(self, model: nn.Module, batch: dict) -> Tensor:
        """Clean logits ``(B, K)`` from ``input_ids`` ``(B, L)``; gradients reach every parameter."""
        return model(input_ids=batch["input_ids"], **self._model_inputs(batch)).logits

    def surface(self, model: nn.Module, batch: dict) -> AttackSurface:
        """Token-embedding surface: ``x`` ``(B, L, D)`` detached, mask ``(B, L, 1)`` from the attention mask,
        one L-p ball per token, radii relative to the mean token-embedding norm.

        ``forward(delta)`` recomputes the embedding lookup *with* gradient to the embedding matrix (so
        adversarial training also trains it) and calls ``model`` as passed (DDP-wrapped or not) on
        ``inputs_embeds = emb + delta``."""
        embeddings = getattr(model, "module", model).get_input_embeddings()
        input_ids = batch["input_ids"]
        extra = self._model_inputs(batch)
        with torch.no_grad():
            x = embeddings(input_ids)
        mask = batch["attention_mask"].unsqueeze(-1).to(x.dtype) if "attention_mask" in batch else None

        def forward(delta: Tensor) -> Tensor:
            emb = embeddings(input_ids)
            return model(inputs_embeds=emb + delta.to(emb.dtype), **extra).logits

        return AttackSurface(x=x, forward=forward, mask=mask, bounds=None, norm_dims=(-1,),
                             eps_scale=embedding_scale(model))


    # ----------------------------------------------------------------------------------------- after

    def num_attack_examples(self, on_gpu: bool) -> int:
        n = self.args.textattack_num_examples
        return (500 if on_gpu else 30) if n is None else n

    def extra_evaluation(self, model: nn.Module, accelerator: Any, run: Any) -> dict:
        """TextAttack recipes on the eval split: ``{"textattack": {recipe: summary}}`` (see
        :func:`samat.text.textattack.runner.summarize`). The examples are split over the processes and the
        per-example results gathered, so every process returns the same dict."""
        recipes = _recipe_list(self.args.textattack_recipes)
        if not recipes or self.state is None:
            return {}
        from .textattack.runner import attack_model, format_summaries

        n = self.num_attack_examples(accelerator.device.type == "cuda")
        summaries, _ = attack_model(model, self.state.tokenizer, self.state.attack_examples, recipes, n,
                                    max_length=self.args.max_length, batch_size=self.args.textattack_batch_size,
                                    query_budget=self.args.textattack_query_budget, seed=run.seed,
                                    accelerator=accelerator)
        if accelerator.is_main_process:
            logger.info("TextAttack on %d eval sentences:\n%s", n, format_summaries(summaries))
        return {"textattack": summaries}

    def extra_columns(self, metrics: dict) -> dict[str, float]:
        """``textattack/<recipe>/<field>`` for each recipe's accuracy under attack, success rate, share of
        perturbed words and queries."""
        return textattack_columns(metrics.get("textattack") or {})

    def save_model(self, model: nn.Module, path: str) -> None:
        """A ``from_pretrained`` folder: model (safetensors + config with label names), tokenizer, and
        ``samat_text.json`` (dataset, split, columns, max length) so ``scripts/attack_text.py`` attacks it on
        the data it was trained for. Needs the task as built (``TaskData.task``)."""
        if self.state is None:
            raise ValueError("save_model needs the built task (TaskData.task): the tokenizer comes from build")
        model.save_pretrained(path)
        self.state.tokenizer.save_pretrained(path)
        write_json_atomic(Path(path) / INFO_FILE, self.state.info)

    def load_model(self, path: str) -> nn.Module:
        """The classifier :meth:`save_model` wrote (label names in its config). Its tokenizer is saved beside
        it: ``AutoTokenizer.from_pretrained(path)``."""
        return text_models.load_classifier(path, require_classifier=True).model


TEXTATTACK_COLUMNS = ("accuracy_under_attack", "attack_success_rate", "avg_perturbed_word_pct", "avg_queries")


def textattack_columns(summaries: dict) -> dict[str, float]:
    """Flat columns from ``{recipe: summary}`` (see :meth:`TextTask.extra_columns`)."""
    return {f"textattack/{recipe}/{key}": float(summary[key])
            for recipe, summary in summaries.items() if isinstance(summary, dict)
            for key in TEXTATTACK_COLUMNS if isinstance(summary.get(key), (int, float))}


def embedding_scale(model: nn.Module) -> float:
    """Mean L2 norm of the rows of ``model``'s input-embedding matrix (the unit of text eps).

    Read from the device once per version of the matrix (an optimizer step updates it in place and bumps its
    ``_version``), not on every ``surface()``: the norm of a vocabulary-sized matrix and a host sync for each
    attack and each training forward of a step, where one per step gives the same number."""
    weight = getattr(model, "module", model).get_input_embeddings().weight
    cached = getattr(weight, "_samat_scale", None)  # (version, value), kept on the matrix itself
    if cached is not None and cached[0] == weight._version:
        return cached[1]
    with torch.no_grad():
        value = float(weight.detach().float().norm(dim=-1).mean())
    weight._samat_scale = (weight._version, value)
    return value
