"""Records → multiple-choice items → (prompt, target): the single source of the prompt formats.

Training and evaluation must build their strings here: a model trained on one format and scored on
another measures the mismatch, not the adapter. ``build_prompt(mc, style)`` is the prompt and
``option_continuations(mc, style)`` the continuation of every option; the training target of an
item is its gold option's continuation, so the scorer compares exactly what training taught.

The commonsense format (the instruction format common to commonsense fine-tuning sets):
``instruction`` holds the question, the numbered options (``Answer1: … Answer2: …`` on one line, or
``Solution1: …`` blocks separated by blank lines) or a true/false question, and ends with
``Answer format: answer1/…``; ``answer`` is the gold label; ``output`` is ``the correct answer is
<label>``.

Styles (prompt → continuations, with a leading space because the continuation follows the prompt
on the same line, as in lm-evaluation-harness):

- ``text`` (cloze): ``"Question: <question>\\nAnswer:"`` → ``" <option text>"``; a passage
  (``input`` / ``context_field``) goes on its own line before ``Question:``. True/false items keep
  their own option words, ``" true"`` / ``" false"`` (lm-evaluation-harness's BoolQ uses ``" yes"`` /
  ``" no"``; keeping the options' words makes ``option text == continuation text`` hold for every
  task, and the commonsense BoolQ records name the answers true/false).
- ``label``: the full instruction (plus input) → ``" answer2"`` (the label).
- ``generation``: the full instruction (plus input) → ``" the correct answer is answer2"`` (the
  record's ``output`` when training; records need not be multiple choice).

With a chat template (``chat_tokenizer``), the prompt is the user turn followed by the assistant
header, and the continuation is the assistant's text without the leading space.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional

from malora_dist.config.data import TaskConfig
from malora_dist.data.errors import DataError
from malora_dist.data.formats import map_record
from malora_dist.data.items import (
    BOOLEAN_LABELS,
    GENERATION_ANSWER,
    Generation,
    MultipleChoice,
    optional_text,
    required_field,
    required_text,
    with_passage,
)

_ANSWER_FORMAT = re.compile(r"\s*Answer format:\s*(?P<labels>\S+)\s*$")
_LABEL = re.compile(r"[a-z]+\d+")
_PREFIX = re.compile(r"^Please (?:choose|answer|select)\b.*?\bquestion:\s*", re.DOTALL)


def parse_multiple_choice(record: dict, task: Optional[TaskConfig] = None) -> MultipleChoice:
    """Read a record as a multiple-choice item: the commonsense format by default, or the
    ``question_field``/``options_field``/``answer_field`` of ``task``. Raises ``DataError``."""
    if task is not None and task.question_field is not None:
        return _from_fields(record, task)
    answer_field = task.answer_field if task is not None else "answer"
    instruction = required_text(record, "instruction")
    context = optional_text(record, "input")
    answer = str(required_field(record, answer_field)).strip()
    found = _ANSWER_FORMAT.search(instruction)
    if found is None:
        raise DataError("the instruction has no final 'Answer format: …' line naming the options")
    labels = found.group("labels").split("/")
    body = instruction[: found.start()]
    if [label.lower() for label in labels] == BOOLEAN_LABELS:
        labels = list(BOOLEAN_LABELS)
        question, options = body, list(BOOLEAN_LABELS)
    else:
        question, options = _split_options(body, labels)
    gold = [label.lower() for label in labels]
    if answer.lower() not in gold:
        raise DataError(f"{answer_field} {answer!r} is not one of the labels {labels} of the 'Answer format' line")
    return MultipleChoice(
        question=_PREFIX.sub("", question.strip(), count=1),
        options=options,
        labels=labels,
        gold_index=gold.index(answer.lower()),
        context=context,
        instruction=with_passage(instruction, context),
    )


def _split_options(body: str, labels: list[str]) -> tuple[str, list[str]]:
    """Cut ``body`` at the markers ``Answer1:`` … (in order, each at the start or after whitespace)."""
    starts, ends = [], []
    pos = 0
    for label in labels:
        if not _LABEL.fullmatch(label):
            raise DataError(f"unexpected option label {label!r} in the 'Answer format' line")
        marker = f"{label[0].upper()}{label[1:]}:"
        found = re.compile(r"(?:^|(?<=\s))" + re.escape(marker) + r"[ \t]*").search(body, pos)
        if found is None:
            raise DataError(f"the 'Answer format' line names {label!r} but no {marker!r} follows the previous option")
        starts.append(found.start())
        ends.append(found.end())
        pos = found.end()
    options = [body[ends[i] : starts[i + 1] if i + 1 < len(labels) else len(body)].strip() for i in range(len(labels))]
    empty = [label for label, option in zip(labels, options) if not option]
    if empty:
        raise DataError(f"option(s) {empty} have no text")
    return body[: starts[0]], options


def _from_fields(record: dict, task: TaskConfig) -> MultipleChoice:
    question = required_text(record, task.question_field)
    raw = required_field(record, task.options_field)
    option_keys = None
    if isinstance(raw, dict) and "text" in raw:  # the hub's {"text": [...], "label": ["A", ...]} layout
        option_keys = [str(k) for k in raw.get("label") or []]
        raw = raw["text"]
    if not isinstance(raw, (list, tuple)) or len(raw) < 2 or not all(isinstance(o, str) and o.strip() for o in raw):
        raise DataError(f"field {task.options_field!r} must hold a list of ≥ 2 non-empty option texts, got {raw!r}")
    options = [o.strip() for o in raw]
    labels = [f"answer{i + 1}" for i in range(len(options))]
    answer = required_field(record, task.answer_field)
    if isinstance(answer, int) and not isinstance(answer, bool):
        gold = answer
    else:
        answer = str(answer).strip()
        keys = [labels, option_keys or [], options]
        gold = next((k.index(answer) for k in keys if answer in k), None)
        if gold is None:
            raise DataError(f"{task.answer_field} {answer!r} is neither an option index, a label nor an option's text")
    if not 0 <= gold < len(options):
        raise DataError(f"{task.answer_field} {gold} is out of range for {len(options)} options")
    context = optional_text(record, task.context_field) if task.context_field else ""
    return MultipleChoice(question=question.strip(), options=options, labels=labels, gold_index=gold, context=context)


def build_prompt(mc: MultipleChoice, style: str, chat_tokenizer: Any = None) -> str:
    """The prompt of ``mc`` in ``style`` (the same for training and for scoring the options).

    chat_tokenizer: pass the tokenizer when ``use_chat_template`` is on, to wrap the prompt in its
    chat template; ``None`` for plain text.
    """
    if style == "text":
        prompt = _with_passage_before(f"Question: {mc.question}\nAnswer:", mc.context)
    elif style in ("label", "generation"):
        prompt = mc.instruction
    else:
        raise ValueError(f"unknown prompt style {style!r}: use text, label or generation")
    return wrap_chat(prompt, chat_tokenizer)


def option_continuations(mc: MultipleChoice, style: str, chat_tokenizer: Any = None) -> list[str]:
    """The continuation of each option of ``mc`` in ``style``; index ``mc.gold_index`` is the
    training target. ``chat_tokenizer`` as in ``build_prompt`` (it drops the leading space)."""
    if style == "text":
        texts = mc.options
    elif style == "label":
        texts = mc.labels
    elif style == "generation":
        texts = [GENERATION_ANSWER.format(label=label) for label in mc.labels]
    else:
        raise ValueError(f"unknown prompt style {style!r}: use text, label or generation")
    space = "" if chat_tokenizer is not None else " "
    return [space + t for t in texts]


def wrap_chat(prompt: str, chat_tokenizer: Any) -> str:
    """The user turn plus the assistant header of the tokenizer's chat template (or ``prompt``)."""
    if chat_tokenizer is None:
        return prompt
    if not getattr(chat_tokenizer, "chat_template", None):
        raise ValueError(
            "data.use_chat_template is true but the tokenizer has no chat template: "
            "set use_chat_template: false, or use an instruct model's tokenizer"
        )
    return chat_tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )


@dataclass
class Example:
    """One training or evaluation example: ``prompt`` then ``target`` (both final strings).

    mc: the multiple-choice item, for scoring options at evaluation; ``None`` for free-form
    ``generation`` records. reference: what a free-form metric compares the model's answer with
    (``formats.Generation.reference``); empty otherwise.
    """

    task_id: int
    prompt: str
    target: str
    where: str
    mc: Optional[MultipleChoice] = None
    reference: dict = field(default_factory=dict)


def record_to_example(record: dict, task: TaskConfig, task_id: int, where: str, chat_tokenizer: Any = None) -> Example:
    """The example of a record in its task's format and style. Raises ``DataError`` (without ``where``)."""
    if task.format != "commonsense":

        item = map_record(record, task.format)
        if isinstance(item, Generation):
            space = "" if chat_tokenizer is not None or item.continues_prompt else " "
            prompt = wrap_chat(with_passage(item.instruction, item.input), chat_tokenizer)
            return Example(task_id, prompt, space + item.output, where, reference=item.reference)
        return _multiple_choice_example(item, task.style, task_id, where, chat_tokenizer)
    if task.style != "generation":
        return _multiple_choice_example(parse_multiple_choice(record, task), task.style, task_id, where, chat_tokenizer)
    instruction = with_passage(required_text(record, "instruction"), optional_text(record, "input"))
    output = required_text(record, "output").strip()
    try:
        mc = parse_multiple_choice(record, task)
    except DataError:
        mc = None
    space = "" if chat_tokenizer is not None else " "
    return Example(task_id, wrap_chat(instruction, chat_tokenizer), space + output, where, mc)


def _multiple_choice_example(mc: MultipleChoice, style: str, task_id: int, where: str, chat_tokenizer: Any) -> Example:
    target = option_continuations(mc, style, chat_tokenizer)[mc.gold_index]
    return Example(task_id, build_prompt(mc, style, chat_tokenizer), target, where, mc)


def _with_passage_before(text: str, passage: str) -> str:
    return f"{passage}\n{text}" if passage else text
