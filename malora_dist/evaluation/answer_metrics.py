"""The metrics of free-form answers, by ``data.tasks[].metric`` (multiple choice is scored from
option log-probabilities in ``scoring``):

- ``exact_match``: the greedy answer equals the target (after stripping);
- ``gsm8k``: the answer's final number equals the reference's (math word problems);
- ``rouge_l``: ROUGE-L F1 against the reference(s), by Google's ``rouge-score`` package (stemmed,
  the best over several references), as the E2E NLG challenge reports it;
- ``pass_at_1``: the completion passes the problem's tests in the sandbox (``code_execution``).

A task's score is the mean over its examples.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

from rouge_score import rouge_scorer

from malora_dist.evaluation.code_execution import run_completion

# New tokens a free-form answer may take, by metric; exact_match allows the target's length plus
# GENERATION_SLACK (``scoring``), since a longer answer is wrong anyway.
MAX_NEW_TOKENS = {"gsm8k": 320, "rouge_l": 128, "pass_at_1": 384}
ACCURACY_METRICS = ("multiple_choice", "exact_match", "gsm8k", "pass_at_1")

# The final answer as MetaMathQA ("The answer is: 18") and GSM8K ("#### 18") mark it; otherwise
# the last number in the text, as lm-evaluation-harness's gsm8k "flexible-extract" filter reads it.
_MARKED = re.compile(r"(?:The answer is:?|####)\s*\$?\s*(?P<number>-?[\d,]*\.?\d+)", re.IGNORECASE)
_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def final_number(text: str) -> Optional[str]:
    """The final number of a worked answer: after its last 'The answer is:' / '####' marker,
    else the last number in it; ``None`` if it has none. Thousands separators are dropped."""
    marked = list(_MARKED.finditer(text))
    if marked:
        number = marked[-1].group("number")
    else:
        numbers = [n for n in _NUMBER.findall(text) if any(c.isdigit() for c in n)]
        if not numbers:
            return None
        number = numbers[-1]
    return number.replace(",", "").rstrip(".")


def same_number(a: Optional[str], b: Optional[str]) -> bool:
    """Numeric equality of two number strings ("18" == "18.00"); False if either is missing or not
    a plain number (MetaMathQA has answers like \\frac{1}{2}: those compare as text)."""
    if a is None or b is None:
        return False
    try:
        return Fraction(a) == Fraction(b)
    except (ValueError, ZeroDivisionError):
        return a.strip() == b.strip()


def gsm8k_correct(prediction: str, reference_answer: str) -> bool:
    """The prediction's final number equals the reference's answer (as formats read it off the
    record: ``#### N`` / ``The answer is: N``)."""
    return same_number(final_number(prediction), reference_answer.replace(",", ""))


_ROUGE = None


def rouge_l(prediction: str, references: list[str]) -> float:
    """ROUGE-L F1 of ``prediction`` against the best of ``references`` (stemmed, rouge-score)."""
    global _ROUGE
    if _ROUGE is None:  # building the scorer loads NLTK's stemmer once

        _ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return _ROUGE.score_multi(references, prediction)["rougeL"].fmeasure


@dataclass
class AnswerScore:
    """score: 1/0 for the accuracy metrics, ROUGE-L F1 for rouge_l. status: how a program ran
    (pass_at_1), else ''."""

    score: float
    status: str = ""


def score_answer(metric: str, prediction: str, target: str, reference: dict) -> AnswerScore:
    """Score one generated answer (``prediction``) by ``metric`` against its example's target and
    reference (``formats.Generation.reference``)."""
    if metric == "exact_match":
        return AnswerScore(float(prediction.strip() == target.strip()))
    if metric == "gsm8k":
        return AnswerScore(float(gsm8k_correct(prediction, reference["answer"])))
    if metric == "rouge_l":
        return AnswerScore(rouge_l(prediction, reference["references"]))
    if metric == "pass_at_1":

        result = run_completion(reference["problem"], prediction)
        return AnswerScore(float(result.passed), result.status)
    raise ValueError(f"unknown metric {metric!r} for a generated answer")
