"""TextAttack recipes against samat's classifiers, in three steps a newcomer can follow:

- :mod:`.wrapper`: :class:`BatchedModelWrapper`, how TextAttack queries our model (eval mode, batched,
  padded per batch);
- :mod:`.recipes`: the registry of recipes by name, what each needs, :func:`check_recipes` (unknown or
  unavailable recipes fail at once, in one line) and :func:`build_attack`; the local TextFooler-style
  parts (embedding neighbours, antonym filter, local sentence encoder) live in :mod:`.embedding_swap`;
- :mod:`.runner`: :func:`attack_model` runs recipes on examples (split over processes) and
  :func:`summarize` turns per-sentence records into TextAttack's summary metrics.

``import textattack`` itself (slow, and it needs NLTK data offline) happens only when an attack is built,
through :func:`samat.text.resources.import_textattack`.
"""

from .recipes import RECIPES, Recipe, build_attack, check_recipes
from .runner import SUMMARY_COLUMNS, attack_examples, attack_model, format_summaries, summarize, summary_table
from .wrapper import BatchedModelWrapper

__all__ = ["BatchedModelWrapper", "RECIPES", "Recipe", "SUMMARY_COLUMNS", "attack_examples", "attack_model",
           "build_attack", "check_recipes", "format_summaries", "summarize", "summary_table"]
