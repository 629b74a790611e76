"""Corpus BLEU from sacrebleu (0-100), with sacrebleu's defaults: 13a tokenisation, exponential smoothing."""

import datasets
import evaluate
import sacrebleu

_DESCRIPTION = """
Corpus-level BLEU (Papineni et al., 2002) as computed by sacrebleu (Post, 2018), on a 0-100 scale, with one
reference per prediction. Short answers have few higher-order n-grams, so BLEU is smoothed (sacrebleu's default
exponential smoothing) and is best read next to chrF and exact match.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of generated strings.
    references: list of reference strings, one per prediction.
    tokenize: sacrebleu tokeniser name (default "13a").
    lowercase: compare lower-cased text (default False).
Returns:
    bleu: float in [0, 100].
"""


class Bleu(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="Post, Matt. A Call for Clarity in Reporting BLEU Scores. WMT 2018.",
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
            codebase_urls=["https://github.com/mjpost/sacrebleu"],
        )

    def _compute(self, predictions, references, tokenize="13a", lowercase=False):
        result = sacrebleu.corpus_bleu(list(predictions), [list(references)], tokenize=tokenize, lowercase=lowercase)
        return {"bleu": float(result.score)}
