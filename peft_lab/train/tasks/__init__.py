"""Tasks: registry key = module name = `model.task` (sequence_classification, causal_lm, diffusion)."""

from peft_lab.train.tasks.base import TASKS, Task

__all__ = ["TASKS", "Task"]
