"""Robust accuracy: the accuracy of a classifier on adversarial inputs, with the clean accuracy and the attack
success rate beside it, and macro-F1 (unweighted mean of per-class F1) for imbalanced labels.

An ``evaluate`` metric module; samat loads it by path (``samat.common.hf_metrics.load_robust_accuracy``).
Inputs are per-example class indices: ``predictions`` the predicted class on the attacked input (for a suite of
attacks, the worst case: any attack that fools the model), ``references`` the true class, and optionally
``clean_predictions`` the predicted class on the clean input.
"""

import datasets
import evaluate

_DESCRIPTION = __doc__
_KWARGS = """
Args:
    predictions (list of int): predicted class of each example under attack.
    references (list of int): true class of each example.
    clean_predictions (list of int, optional): predicted class of each clean example.
Returns:
    robust_accuracy: share of examples classified correctly under attack, in [0, 1].
    robust_macro_f1: macro-F1 of the predictions under attack, in [0, 1].
    clean_accuracy, clean_macro_f1, attack_success_rate (with clean_predictions): the clean metrics, and the
        share of the clean-correct examples that the attack fools (nan when none is clean-correct).
"""


def _macro_f1(predictions, references):
    """Mean over the classes seen in either list of 2TP / (2TP + FP + FN)."""
    classes = sorted(set(predictions) | set(references))
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else float("nan")


def _accuracy(predictions, references):
    return sum(p == r for p, r in zip(predictions, references)) / len(references) if references else float("nan")


class RobustAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("int64"),
                                        "references": datasets.Value("int64")}))

    def _compute(self, predictions, references, clean_predictions=None):
        out = {"robust_accuracy": _accuracy(predictions, references),
               "robust_macro_f1": _macro_f1(predictions, references)}
        if clean_predictions is not None:
            if len(clean_predictions) != len(references):
                raise ValueError(f"clean_predictions has {len(clean_predictions)} entries, references "
                                 f"{len(references)}")
            correct = [c == r for c, r in zip(clean_predictions, references)]
            fooled = sum(ok and p != r for ok, p, r in zip(correct, predictions, references))
            out.update(clean_accuracy=_accuracy(clean_predictions, references),
                       clean_macro_f1=_macro_f1(clean_predictions, references),
                       attack_success_rate=fooled / sum(correct) if any(correct) else float("nan"))
        return out
