"""Speed and memory measurements: training against a plain trl script, and generation with and without the adapter.

``bench train`` runs each side in its own process, so peak memory (CUDA peak, or the RSS high-water mark on CPU) is
that side's alone, and prints both sides and their ratio from the same invocation. Tokens are counted from the batches
the trainer actually computes the loss on:

    processed tokens  real tokens of the examples (attention_mask sum, or the non-pad tokens of packed rows)
    loss tokens       labels != -100 after the shift by one (what the loss is averaged over)
    padded tokens     input_ids.numel(): the positions the model computes, padding included

MFU uses the 6N convention (Kaplan et al. 2020; nanoGPT): 6 x N FLOPs per processed token, N = parameters that take
part in matmuls (every linear layer, lm_head included; the embedding lookup excluded), attention scores ignored. For
QLoRA this is also close to the FLOPs really executed: the frozen base needs no weight gradients (2N forward + 2N
input-gradient), and gradient checkpointing recomputes the forward (+2N).
"""

from qlora_kit.bench.generate import bench_generate
from qlora_kit.bench.measure import Meter, machine, measured_quantized_bytes, summarize
from qlora_kit.bench.report import generate_markdown, train_markdown, write_report
from qlora_kit.bench.shapes import materialize_architecture
from qlora_kit.bench.train import bench_train, ratios, run_side

__all__ = [
    "Meter",
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
