"""Speed and memory measurements: training against a plain trl script, and generation with and without the adapter.

``bench train`` runs each side in its own process, so peak memory (CUDA peak, or the RSS high-water mark on CPU) is
that side's alone, and prints both sides and their ratio from the same invocation. Both sides run the recipe's method
(SFT, DPO, ORPO, KTO or SimPO). Tokens are counted from the batches the trainer actually computes the loss on
(``measure.batch_tokens``), the same way on both sides:

    processed tokens  SFT: real tokens of the examples (attention_mask sum, or the non-pad tokens of packed rows).
                      Preference: the input tokens of every sequence the policy reads in a step, padding excluded:
                      prompt + chosen and prompt + rejected for a pair (the prompt counted in both, as both run);
                      for KTO prompt + completion and prompt + the mismatched KL completion. Per pair that is the
                      planner's two sequences (plan.SEQUENCES_PER_EXAMPLE).
    loss tokens       SFT: labels != -100 after the shift by one (what the loss is averaged over). Preference: the
                      completion tokens whose log-probabilities the loss compares (chosen and rejected; KTO's
                      completion, not its KL one), the trained tokens.
    padded tokens     the positions the model computes, padding included
    sequences         rows of the policy's batches (a pair is two sequences)

A preference step also runs the reference (DPO, KTO: the same model with the adapter disabled or the starting adapter,
without gradients) on the same tokens, so its tokens/s is not comparable with an SFT run's.

MFU (SFT only) uses the 6N convention (Kaplan et al. 2020; nanoGPT): 6 x N FLOPs per processed token, N = parameters
that take part in matmuls (every linear layer, lm_head included; the embedding lookup excluded), attention scores
ignored. For QLoRA this is also close to the FLOPs really executed: the frozen base needs no weight gradients (2N
forward + 2N input-gradient), and gradient checkpointing recomputes the forward (+2N). A preference step's FLOPs per
token depend on the method (reference and KL passes without gradients), so no MFU is reported for it.
"""

from qlora_kit.bench.generate import bench_generate
from qlora_kit.bench.measure import Meter, batch_tokens, machine, measured_quantized_bytes, summarize
from qlora_kit.bench.report import generate_markdown, train_markdown, write_report
from qlora_kit.bench.shapes import materialize_architecture
from qlora_kit.bench.train import bench_train, ratios, run_side

__all__ = [
    "Meter",
    "batch_tokens",
    "bench_generate",
    "bench_train",
    "generate_markdown",
    "machine",
    "materialize_architecture",
    "measured_quantized_bytes",
    "ratios",
    "run_side",
    "summarize",
    "train_markdown",
    "write_report",
]
