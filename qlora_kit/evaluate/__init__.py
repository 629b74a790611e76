"""Evaluation: held-out loss, batched generation, generation metrics, lm-eval benchmarks and the report.

``qlora_kit.evaluate.stage.run_eval`` is the ``qlora-kit eval`` stage; ``qlora_kit.evaluate.callback`` holds the
optional in-training generation eval. The functions below are the building blocks training uses too.
"""

from qlora_kit.evaluate.generation import (
    GenerationSettings,
    compare_base_and_tuned,
    exact_match,
    generate,
    generate_ids,
    heldout_loss,
    normalize,
    perplexity,
)

__all__ = [
    "GenerationSettings",
    "compare_base_and_tuned",
    "exact_match",
    "generate",
    "generate_ids",
    "heldout_loss",
    "normalize",
    "perplexity",
]
