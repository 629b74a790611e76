"""Corpus chrF from sacrebleu (0-100): character n-gram F-score, robust for short answers and morphology."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level chrF (Popovic, 2015) as computed by sacrebleu, on a 0-100 scale, with one reference per prediction.
char_order 6 and beta 2 are sacrebleu's defaults; word_order 2 gives chrF++.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    char_order: longest character n-gram (default 6).
    word_order: longest word n-gram (default 0; 2 gives chrF++).
    beta: weight of recall over precision (default 2).
Returns:
    chrf: float in [0, 100].
"""


class Chrf(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Popovic, Maja. chrF: character n-gram F-score for automatic MT evaluation. WMT 2015.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, char_order=6, word_order=0, beta=2):
        result = sacrebleu.corpus_chrf(
            list(predictions), [list(references)], char_order=char_order, word_order=word_order, beta=beta
        )
        return {"chrf": float(result.score)}
