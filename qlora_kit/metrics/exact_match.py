"""Exact match after light normalisation: case, surrounding whitespace and a trailing full stop do not count."""

import re

import datasets
import evaluate

_DESCRIPTION = """
The share of predictions equal to their reference after normalisation: both are lower-cased, runs of whitespace
become one space, and surrounding spaces, full stops and exclamation marks are stripped. 1.0 means every prediction
matched. This is the same normalisation qlora-kit's training report uses.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    normalize: whether to normalise before comparing (default True); False compares the raw strings.
Returns:
    exact_match: float in [0, 1].
Examples:
    >>> metric = evaluate.load("qlora_kit/metrics/exact_match.py")
    >>> metric.compute(predictions=["Paris.", "4"], references=["paris", "5"])
    {'exact_match': 0.5}
"""


def _normalize(text):
    return re.sub(r"\s+", " ", text.strip().lower()).strip(" .!")


class ExactMatch(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references, normalize=True):
        if not references:
            return {"exact_match": 0.0}
        prepare = _normalize if normalize else (lambda text: text)
        hits = sum(prepare(p) == prepare(r) for p, r in zip(predictions, references, strict=True))
        return {"exact_match": hits / len(references)}
