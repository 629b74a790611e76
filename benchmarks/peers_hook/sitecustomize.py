"""Per-step timing and token counts for any transformers Trainer, loaded into each tool's process by peers.py.

Python imports ``sitecustomize`` at start-up when this folder is on PYTHONPATH. Nothing happens unless
QLORA_KIT_PEERS_OUT names the JSON file to write; then, once ``transformers.trainer`` is imported (by whichever tool),
``Trainer.training_step`` is wrapped to count each batch's tokens and loss, and every Trainer gets a callback that
stamps the end of each optimizer step. The file is written when training ends, with the process's peak CUDA memory
(``torch.cuda.max_memory_allocated``) when the tool trained on a GPU. The same code measures every tool.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import sys
import time

OUT = os.environ.get("QLORA_KIT_PEERS_OUT")


def input_tokens(inputs, pad_token_id) -> int:
    """Real (non-padding) tokens the model reads in a batch, whatever layout the tool's collator uses."""
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        return int((mask != 0).sum())  # 0/1 masks and segment-id masks alike
    if mask is not None and mask.dim() == 4:
        import torch

        diagonal = mask[:, 0].diagonal(dim1=-2, dim2=-1)  # a real token attends to itself: True, or 0 added
        return int(diagonal.sum()) if mask.dtype == torch.bool else int((diagonal == 0).sum())
    ids = inputs["input_ids"]
    return int((ids != pad_token_id).sum()) if pad_token_id is not None else ids.numel()


def patch(trainer_module) -> None:
    from transformers import TrainerCallback

    record = {"steps": [], "pending": {"input": 0, "trained": 0, "loss": []}}
    original_step = trainer_module.Trainer.training_step
    original_init = trainer_module.Trainer.__init__

    def training_step(self, model, inputs, *args, **kwargs):
        tokenizer = getattr(self, "processing_class", None)
        pad = getattr(tokenizer, "pad_token_id", None)
        record["pending"]["input"] += input_tokens(inputs, pad)
        record["pending"]["trained"] += int((inputs["labels"][..., 1:] != -100).sum())
        loss = original_step(self, model, inputs, *args, **kwargs)
        record["pending"]["loss"].append(float(loss.detach().float()))
        return loss

    class Stamp(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            _synchronize()  # on a GPU the optimizer step is queued, not done: the stamp waits for it
            _profile_window(state.global_step)
            pending = record["pending"]
            losses = pending["loss"]
            loss = sum(losses) / len(losses) if losses else None
            record["steps"].append(
                {"t": time.time(), "input": pending["input"], "trained": pending["trained"], "loss": loss}
            )
            record["pending"] = {"input": 0, "trained": 0, "loss": []}

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            record["model"] = _weights(model)

        def on_train_end(self, args, state, control, **kwargs):
            summary = {"steps": record["steps"], "threads": _threads(), **record.get("model", {}), **_cuda_peak()}
            with open(OUT, "w") as handle:
                json.dump(summary, handle)

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.add_callback(Stamp())

    trainer_module.Trainer.training_step = training_step
    trainer_module.Trainer.__init__ = init


PROFILE = os.environ.get("QLORA_KIT_PEERS_PROFILE")
PROFILED_STEPS = (5, 10)  # the torch profiler runs from the end of step 5 to the end of step 10: whole steps


_profiler = None  # the running torch profiler, between the first and the last profiled step


def _profile_window(step: int) -> None:
    """With QLORA_KIT_PEERS_PROFILE set, profile whole optimizer steps (data, forward, backward, optimizer)."""
    global _profiler
    if not PROFILE:
        return
    import torch

    first, last = PROFILED_STEPS
    if step == first:
        _profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
        _profiler.start()
    elif step == last and _profiler is not None:
        _profiler.stop()
        averages = _profiler.key_averages()
        with open(PROFILE, "w") as handle:
            handle.write(f"steps {first + 1}-{last}, {torch.get_num_threads()} thread(s)\n")
            handle.write(averages.table(sort_by="self_cpu_time_total", row_limit=30, max_name_column_width=70))


def _weights(model) -> dict:
    """How the trained model stores its weights: a tool that silently trains unquantized must not pass for QLoRA."""
    if model is None:
        return {}
    four_bit = sum(1 for p in model.parameters() if type(p).__name__ == "Params4bit")
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    # transformers 5.23 renamed is_gradient_checkpointing to is_activation_checkpointing; the peers pin older ones.
    checkpointing = getattr(model, "is_activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(model, "is_gradient_checkpointing", False)
    return {
        "four_bit_weights": four_bit,
        "trainable_parameters": trainable,
        "gradient_checkpointing": bool(checkpointing),
    }


def _cuda_in_use() -> bool:
    """Whether this process has put anything on a GPU (CUDA initialized), without initializing it on a CPU run."""
    import torch

    return torch.cuda.is_available() and torch.cuda.is_initialized()


def _synchronize() -> None:
    if _cuda_in_use():
        import torch

        torch.cuda.synchronize()


def _cuda_peak() -> dict:
    """The most CUDA memory tensors held at once in this process (model load included), in bytes; {} on CPU."""
    if not _cuda_in_use():
        return {}
    import torch

    return {"cuda_peak_allocated_bytes": torch.cuda.max_memory_allocated()}


def _threads() -> int:
    import torch

    return torch.get_num_threads()


class _PatchOnImport(importlib.abc.MetaPathFinder):
    """Patch transformers.trainer right after it is first imported."""

    def find_spec(self, name, path=None, target=None):
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module):
            exec_module(module)
            patch(module)

        loader.exec_module = exec_and_patch
        return spec


if OUT:
    import importlib.util

    sys.meta_path.insert(0, _PatchOnImport())
