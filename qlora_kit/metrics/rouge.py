"""ROUGE-1, ROUGE-2, ROUGE-L and ROUGE-Lsum F-measures from Google's rouge_score, averaged over examples."""

import datasets
import evaluate
from rouge_score import rouge_scorer

_DESCRIPTION = """
ROUGE F-measures (Lin, 2004) computed by the rouge_score package, one score per example, averaged over examples
(a plain mean, so the result is deterministic; the Hub's rouge metric reports a bootstrap estimate of the same mean).
rouge1/rouge2 count overlapping unigrams/bigrams; rougeL uses the longest common subsequence; rougeLsum splits the
texts into lines first.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    use_stemmer: apply the Porter stemmer before matching (default False).
Returns:
    rouge1, rouge2, rougeL, rougeLsum: floats in [0, 1].
"""

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Lin, Chin-Yew. ROUGE: A Package for Automatic Evaluation of Summaries. 2004.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/google-research/google-research/tree/master/rouge"],
        )

    def _compute(self, predictions, references, use_stemmer=False):
        scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
        totals = dict.fromkeys(ROUGE_TYPES, 0.0)
        for prediction, reference in zip(predictions, references, strict=True):
            # rouge_score takes (target, prediction): the reference comes first.
            scores = scorer.score(reference, prediction)
            for key in ROUGE_TYPES:
                totals[key] += scores[key].fmeasure
        count = max(len(references), 1)
        return {key: total / count for key, total in totals.items()}
