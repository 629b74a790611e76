"""A small generation eval during training: every N steps, answer a few held-out prompts and log exact match.

The value goes through ``trainer.log``, so it lands in the trainer's log history (and metrics.json's loss curve data)
and in every reporting integration (TensorBoard, ...) next to the training loss.
"""

from __future__ import annotations

from transformers import Trainer, TrainerCallback

from qlora_kit.evaluate.generation import GenerationSettings, exact_match, generate


class GenerationEvalCallback(TrainerCallback):
    """Every ``every_steps`` optimizer steps, generate greedily on held-out prompts and log ``eval_exact_match``."""

    def __init__(
        self, trainer, tokenizer, pairs: list[tuple[str, str]], every_steps: int, settings: GenerationSettings
    ) -> None:
        self.trainer = trainer
        self.tokenizer = tokenizer
        self.prompts = [p for p, _ in pairs]
        self.references = [r for _, r in pairs]
        self.every_steps = every_steps
        self.settings = settings

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if not self.prompts or state.global_step % self.every_steps or not state.is_world_process_zero:
            return control
        was_training = model.training
        answers = generate(model, self.tokenizer, self.prompts, settings=self.settings)
        if was_training:
            model.train()
        # Logging resets control.should_log, which would drop the trainer's own loss line due at this step; and
        # trl's SFTTrainer.log folds its running training averages into whatever is logged, so the plain
        # transformers Trainer.log is called to leave those for the next loss line.
        should_log = control.should_log
        Trainer.log(self.trainer, {"eval_exact_match": exact_match(answers, self.references)})
        control.should_log = should_log
        return control


def generation_eval_callback(trainer, tokenizer, eval_rows, recipe) -> GenerationEvalCallback:
    """The callback for a recipe: eval.callback_samples held-out prompts, greedy, eval.max_new_tokens each."""
    from qlora_kit.data import eval_prompts

    pairs = eval_prompts(eval_rows, tokenizer, recipe.eval.callback_samples)
    settings = GenerationSettings(max_new_tokens=recipe.eval.max_new_tokens, batch_size=recipe.eval.batch_size)
    return GenerationEvalCallback(trainer, tokenizer, pairs, recipe.eval.callback_steps, settings)
