"""The two kinds of item a record becomes: a multiple-choice question (options, labels, the gold
index) or a free-form one (an instruction and its target); and the checked readers of a record's
fields that every format's mapping uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from malora_dist.data.errors import DataError

BOOLEAN_LABELS = ["true", "false"]
# A multiple-choice item's answer in the generation style.
GENERATION_ANSWER = "the correct answer is {label}"


@dataclass
class MultipleChoice:
    """One multiple-choice item.

    question: the question alone (without the instruction's "Please choose …" prefix).
    options: the options' own texts; ``["true", "false"]`` for true/false items.
    labels: the options' labels as the instruction names them (``answer1`` … or ``true``/``false``).
    gold_index: the index of the correct option.
    context: a passage that goes with the question (the record's ``input``), or "".
    instruction: the full instruction the ``label``/``generation`` styles show (with the passage
        after it); built in the commonsense format when the item did not come with one.
    """

    question: str
    options: list[str]
    labels: list[str]
    gold_index: int
    context: str = ""
    instruction: str = field(default="")

    def __post_init__(self):
        if len(self.options) != len(self.labels) or len(self.options) < 2:
            raise DataError(f"a multiple-choice item needs ≥ 2 options, one label each: {self.options} {self.labels}")
        if not 0 <= self.gold_index < len(self.options):
            raise DataError(f"gold_index {self.gold_index} is out of range for {len(self.options)} options")
        if not self.instruction:
            self.instruction = with_passage(format_instruction(self.question, self.options, self.labels), self.context)


def format_instruction(question: str, options: list[str], labels: list[str]) -> str:
    """The commonsense-format instruction of an item (what ``parse_multiple_choice`` reads back).

    labels ``true/false`` give the BoolQ layout, ``solution1…`` the PIQA layout (one block per
    option), anything else the ARC/OBQA layout (options on one line).
    """
    answer_format = f"Answer format: {'/'.join(labels)}"
    if labels == BOOLEAN_LABELS:
        return f"Please answer the following question with true or false, question: {question}\n\n{answer_format}"
    marked = [f"{label[0].upper()}{label[1:]}: {option}" for label, option in zip(labels, options)]
    if labels[0].startswith("solution"):
        body = "\n\n".join(marked)
        return f"Please choose the correct solution to the question: {question}\n\n{body}\n\n{answer_format}"
    return f"Please choose the correct answer to the question: {question}\n\n{' '.join(marked)}\n\n{answer_format}"


def required_field(record: dict, name: str) -> Any:
    value = record.get(name)
    if value is None:
        present = sorted(k for k, v in record.items() if v is not None)
        raise DataError(f"missing field {name!r} (the record has {present})")
    return value


def required_text(record: dict, name: str) -> str:
    value = required_field(record, name)
    if not isinstance(value, str) or not value.strip():
        raise DataError(f"field {name!r} must be non-empty text, got {value!r}")
    return value


def optional_text(record: dict, name: str) -> str:
    value = record.get(name)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be text, got {type(value).__name__}")
    return value.strip()


def with_passage(instruction: str, passage: str) -> str:
    return f"{instruction}\n\n{passage}" if passage else instruction


@dataclass
class Generation:
    """A free-form item: the prompt is ``instruction`` (then ``input`` after a blank line), the
    training target ``output``.

    reference: what the metric compares a generated answer with: ``answer`` (the final number,
        math), ``references`` (texts, ROUGE-L), ``problem`` (HumanEval's prompt, test and entry
        point, pass@1).
    continues_prompt: the output continues the prompt's last line exactly (code completion:
        HumanEval's body after its signature), so no space is put between them.
    """

    instruction: str
    output: str
    input: str = ""
    reference: dict = field(default_factory=dict)
    continues_prompt: bool = False
