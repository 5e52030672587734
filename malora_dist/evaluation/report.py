"""The evaluation report (JSON) and its short table."""

from __future__ import annotations

from .scoring import Item, ItemResult


def example_entry(item: Item, result: ItemResult) -> dict:
    """prompt, options (the scored continuations), scores (summed log-probs, same order),
    prediction and answer (option strings, or generated text and target), correct."""
    if item.options:
        correct = result.choice == item.gold
        answer = item.target
    else:
        answer = item.target.strip()
        correct = result.prediction == answer
    return {"prompt": item.prompt, "options": item.options, "scores": result.scores, "prediction": result.prediction,
            "answer": answer, "correct": correct, "truncated": result.truncated, "where": item.where}


def task_entry(style: str, items: list[Item], results: dict) -> dict:
    examples = [example_entry(item, results[item.key]) for item in items]
    return {
        "accuracy": sum(e["correct"] for e in examples) / len(examples),
        "n": len(examples),
        "style": style,
        "truncated": sum(e["truncated"] for e in examples),
        "examples": examples,
    }


def format_table(report: dict) -> str:
    tasks = report["tasks"]
    width = max([len("task")] + [len(name) for name in tasks])
    lines = [f"{'task':<{width}}  {'style':<10}  {'n':>5}  accuracy"]
    for name, entry in tasks.items():
        lines.append(f"{name:<{width}}  {entry['style']:<10}  {entry['n']:>5}  {entry['accuracy']:.4f}")
    if len(tasks) > 1:
        mean = sum(e["accuracy"] for e in tasks.values()) / len(tasks)
        lines.append(f"{'mean':<{width}}  {'':<10}  {sum(e['n'] for e in tasks.values()):>5}  {mean:.4f}")
    return "\n".join(lines)
