"""Evaluation: each task scored by its ``data.tasks[].metric``: multiple-choice accuracy (option
log-probabilities), or a greedy answer's exact match, final number (GSM8K), ROUGE-L (E2E) or
pass@1 against the problem's tests in a sandbox (HumanEval).

``evaluate_run(config, ...)`` inside a started process group, or ``evaluate_from_config`` (which
starts and stops the process group; ``malora-eval`` and ``launch/evaluate.py`` call it).
Prompts and continuations come from ``malora_dist.data`` (``build_prompt`` / ``option_continuations``,
``encode_prompts`` / ``encode_continuations``), so scoring sees the token sequences training saw.
"""

from malora_dist.evaluation.packing import OptionTree, TreeBatch, tree_batches
from malora_dist.evaluation.report import format_table
from malora_dist.evaluation.run import evaluate, evaluate_run
from malora_dist.evaluation.scoring import generate_answers, option_logprobs, score_multiple_choice
from malora_dist.evaluation.tasks import EvalTask, load_eval_tasks, parse_task_spec, task_configs_from_specs
from malora_dist.inference.model import build_eval_model, validate_eval_layout

__all__ = [
    "EvalTask", "OptionTree", "TreeBatch", "build_eval_model", "evaluate", "evaluate_run", "format_table",
    "generate_answers", "load_eval_tasks", "option_logprobs", "parse_task_spec", "score_multiple_choice",
    "task_configs_from_specs", "tree_batches", "validate_eval_layout",
]
