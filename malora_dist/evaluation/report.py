"""The evaluation report (JSON) and its short table."""

from __future__ import annotations

import json
import os

from malora_dist.evaluation.answer_metrics import ACCURACY_METRICS, score_answer
from malora_dist.evaluation.scoring import Item, ItemResult


def example_entry(item: Item, result: ItemResult) -> dict:
    """prompt, options (the scored continuations), scores (summed log-probs, same order),
    prediction and answer (option strings, or generated text and target), score (1/0, or ROUGE-L
    F1), correct (accuracy metrics), status (how a program ran, pass_at_1)."""
    entry = {"prompt": item.prompt, "options": item.options, "scores": result.scores, "prediction": result.prediction}
    if item.options:
        scored = float(result.choice == item.gold)
        entry.update(answer=item.target, score=scored)
    else:
        answer = score_answer(item.metric, result.prediction, item.target, item.reference)
        entry.update(answer=item.target.strip(), score=answer.score)
        if answer.status:
            entry["status"] = answer.status
    if item.metric in ACCURACY_METRICS:
        entry["correct"] = entry["score"] == 1.0
    entry.update(truncated=result.truncated, where=item.where)
    return entry


def task_entry(style: str, metric: str, items: list[Item], results: dict) -> dict:
    """The task's score (the mean of its examples' scores; also as ``accuracy`` for the accuracy
    metrics), its examples, and how many prompts were cut to fit."""
    examples = [example_entry(item, results[item.key]) for item in items]
    score = sum(e["score"] for e in examples) / len(examples)
    entry = {"metric": metric, "score": score}
    if metric in ACCURACY_METRICS:
        entry["accuracy"] = score
    entry.update(n=len(examples), style=style, truncated=sum(e["truncated"] for e in examples), examples=examples)
    return entry


def format_table(report: dict) -> str:
    tasks = report["tasks"]
    width = max([len("task")] + [len(name) for name in tasks])
    lines = [f"{'task':<{width}}  {'style':<10}  {'n':>5}  {'score':>6}  metric"]
    for name, entry in tasks.items():
        lines.append(f"{name:<{width}}  {entry['style']:<10}  {entry['n']:>5}  {entry['score']:.4f}  {entry['metric']}")
    if len(tasks) > 1:
        mean = sum(e["score"] for e in tasks.values()) / len(tasks)
        lines.append(f"{'mean':<{width}}  {'':<10}  {sum(e['n'] for e in tasks.values()):>5}  {mean:.4f}")
    return "\n".join(lines)


def write_report(report: dict, path: str) -> None:
    """The JSON report at ``path`` (its folder made if missing)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
