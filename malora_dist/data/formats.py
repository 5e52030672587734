"""Field mappings: a dataset's own records (its hub schema) → the project's record forms.

``data.tasks[i].format`` names one mapping. Multiple-choice formats give a ``MultipleChoice`` (then
the task's ``style`` builds prompt and continuations, as for the commonsense files); generation
formats give a ``Generation``: the instruction (and optional input) the model sees, the target it
is trained on, and what the task's metric compares a generated answer with (``reference``).
``commonsense`` is the project's own instruction/input/output/answer form, read by ``prompts``.

Each format is written against its public dataset's schema (hub name in ``hub``); a record that
lacks a field raises ``DataError`` naming the field, so a wrong ``format`` fails at its first record.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

from malora_dist.config.data import FORMAT_SPECS
from malora_dist.data.errors import DataError
from malora_dist.data.items import Generation, MultipleChoice, optional_text, required_field, required_text

# How a model's final answer is marked in math solutions: MetaMathQA's responses end with it, and
# the GSM8K targets are rewritten to it, so a model trained on one answers the other in kind.
FINAL_ANSWER = "The answer is: {answer}"
_GSM8K_FINAL = re.compile(r"\n?\s*####\s*(?P<answer>[^\n]+?)\s*$")
_METAMATH_FINAL = re.compile(r"The answer is:?\s*(?P<answer>.+?)\s*$", re.DOTALL)

PHRASEBANK_LABELS = ("negative", "neutral", "positive")
PHRASEBANK_QUESTION = "What is the sentiment of this financial news sentence? {sentence}"
E2E_INSTRUCTION = "Write a one-sentence description of the restaurant from its attributes."


@dataclass(frozen=True)
class Format:
    """kind: ``multiple_choice`` or ``generation``. hub: the public dataset it is written for.
    metric: the metric a task of this format is scored by unless it sets ``metric``. to_item: the
    mapping (``None`` for ``commonsense``, which ``prompts.record_to_example`` reads itself)."""

    name: str
    kind: str
    hub: str
    metric: str
    to_item: Optional[Callable[[dict], Any]]


def _options_dict(record: dict, key: str) -> tuple[list[str], list[str]]:
    """The hub's ``{"text": [...], "label": ["A", ...]}`` choices (ARC, OpenBookQA)."""
    choices = required_field(record, key)
    texts, keys = (choices.get("text"), choices.get("label")) if isinstance(choices, dict) else (None, None)
    if not isinstance(texts, list) or not isinstance(keys, list) or len(texts) != len(keys) or len(texts) < 2:
        raise DataError(f"field {key!r} must be {{'text': [≥ 2 options], 'label': [one per option]}}, got {choices!r}")
    return [str(t).strip() for t in texts], [str(k).strip() for k in keys]


def _lettered(question: str, texts: list[str], keys: list[str], answer_key: Any) -> MultipleChoice:
    answer = str(answer_key).strip()
    if answer not in keys:
        raise DataError(f"answerKey {answer!r} is not one of the choices' labels {keys}")
    labels = [f"answer{i + 1}" for i in range(len(texts))]
    return MultipleChoice(question=question.strip(), options=texts, labels=labels, gold_index=keys.index(answer))


def arc(record: dict) -> MultipleChoice:
    """allenai/ai2_arc: question, choices{text, label}, answerKey (a letter, or a digit in a few)."""
    texts, keys = _options_dict(record, "choices")
    return _lettered(required_text(record, "question"), texts, keys, required_field(record, "answerKey"))


def openbookqa(record: dict) -> MultipleChoice:
    """allenai/openbookqa: question_stem, choices{text, label}, answerKey."""
    texts, keys = _options_dict(record, "choices")
    return _lettered(required_text(record, "question_stem"), texts, keys, required_field(record, "answerKey"))


def _int_field(record: dict, key: str, count: int) -> int:
    value = required_field(record, key)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < count:
        raise DataError(f"field {key!r} must be an integer in [0, {count}), got {value!r}")
    return value


def boolq(record: dict) -> MultipleChoice:
    """google/boolq: question, passage, answer (bool). Options true/false, as the commonsense BoolQ."""
    answer = required_field(record, "answer")
    if not isinstance(answer, bool):
        raise DataError(f"field 'answer' must be true or false, got {answer!r}")
    return MultipleChoice(question=required_text(record, "question").strip(), options=["true", "false"],
                          labels=["true", "false"], gold_index=0 if answer else 1,
                          context=required_text(record, "passage").strip())


def piqa(record: dict) -> MultipleChoice:
    """ybisk/piqa: goal, sol1, sol2, label (0/1). Labels solution1/2, the commonsense PIQA layout."""
    options = [required_text(record, "sol1").strip(), required_text(record, "sol2").strip()]
    return MultipleChoice(question=required_text(record, "goal").strip(), options=options,
                          labels=["solution1", "solution2"], gold_index=_int_field(record, "label", 2))


def medmcqa(record: dict) -> MultipleChoice:
    """openlifescienceai/medmcqa: question, opa–opd, cop (the correct option, 0-based)."""
    options = [required_text(record, key).strip() for key in ("opa", "opb", "opc", "opd")]
    return MultipleChoice(question=required_text(record, "question").strip(), options=options,
                          labels=[f"answer{i + 1}" for i in range(4)], gold_index=_int_field(record, "cop", 4))


def phrasebank(record: dict) -> MultipleChoice:
    """takala/financial_phrasebank (sentences_allagree): sentence, label 0/1/2 = negative/neutral/positive."""
    sentence = required_text(record, "sentence").strip()
    return MultipleChoice(question=PHRASEBANK_QUESTION.format(sentence=sentence), options=list(PHRASEBANK_LABELS),
                          labels=[f"answer{i + 1}" for i in range(3)], gold_index=_int_field(record, "label", 3))


def _final_answer(text: str, pattern: re.Pattern, what: str) -> tuple[str, str]:
    """(solution without its final-answer line, the final answer) of a math solution."""
    found = pattern.search(text)
    if found is None:
        raise DataError(f"field {what!r} does not end with its final answer ('#### N' / 'The answer is: N')")
    return text[: found.start()].rstrip(), found.group("answer").strip()


def gsm8k(record: dict) -> Generation:
    """openai/gsm8k (main): question, answer (the worked solution, then ``#### N``). The target
    ends with ``The answer is: N`` instead, MetaMathQA's form."""
    solution, answer = _final_answer(required_text(record, "answer"), _GSM8K_FINAL, "answer")
    solution = re.sub(r"<<[^>]*>>", "", solution)  # the calculator annotations are not part of the text
    output = f"{solution}\n{FINAL_ANSWER.format(answer=answer)}" if solution else FINAL_ANSWER.format(answer=answer)
    return Generation(required_text(record, "question").strip(), output, reference={"answer": answer})


def metamathqa(record: dict) -> Generation:
    """meta-math/MetaMathQA: query, response (ending ``The answer is: N``)."""
    response = required_text(record, "response").strip()
    _, answer = _final_answer(response, _METAMATH_FINAL, "response")
    return Generation(required_text(record, "query").strip(), response, reference={"answer": answer})


def magicoder(record: dict) -> Generation:
    """ise-uiuc/Magicoder-OSS-Instruct-75K: problem, solution."""
    solution = required_text(record, "solution").strip()
    return Generation(required_text(record, "problem").strip(), solution, reference={"references": [solution]})


def humaneval(record: dict) -> Generation:
    """openai/openai_humaneval: task_id, prompt (signature and docstring), canonical_solution,
    test (defines ``check``), entry_point. The model continues the prompt's code."""
    problem = {key: required_text(record, key) for key in ("task_id", "prompt", "test", "entry_point")}
    return Generation(problem["prompt"], required_text(record, "canonical_solution"), reference={"problem": problem},
                      continues_prompt=True)


def alpaca(record: dict) -> Generation:
    """vicgalle/alpaca-gpt4, gbharti/finance-alpaca: instruction, input (may be empty), output."""
    output = required_text(record, "output").strip()
    return Generation(required_text(record, "instruction").strip(), output, optional_text(record, "input"),
                      reference={"references": [output]})


def e2e_nlg(record: dict) -> Generation:
    """tuetschek/e2e_nlg: meaning_representation (``name[The Eagle], food[French], …``),
    human_reference. One record per (meaning representation, reference) pair, as the hub has it."""
    reference = required_text(record, "human_reference").strip()
    return Generation(E2E_INSTRUCTION, reference, required_text(record, "meaning_representation").strip(),
                      reference={"references": [reference]})


# Each format's mapping; FORMAT_SPECS (the config's view: kind, hub, default metric) names them.
_MAPPINGS = {"commonsense": None, "arc": arc, "openbookqa": openbookqa, "boolq": boolq, "piqa": piqa,
             "medmcqa": medmcqa, "phrasebank": phrasebank, "gsm8k": gsm8k, "metamathqa": metamathqa,
             "magicoder": magicoder, "humaneval": humaneval, "alpaca": alpaca, "e2e_nlg": e2e_nlg}
assert set(_MAPPINGS) == set(FORMAT_SPECS), "every format in config.data.FORMAT_SPECS needs a mapping here"
FORMATS = {name: Format(name, spec.kind, spec.hub, spec.metric, _MAPPINGS[name]) for name, spec in FORMAT_SPECS.items()}


def map_record(record: dict, format_name: str) -> "MultipleChoice | Generation":
    """The record in the project's form (not for ``commonsense``). Raises ``DataError``."""
    fmt = FORMATS[format_name]
    try:
        return fmt.to_item(record)
    except DataError as err:
        raise DataError(f"{err} (read as format {fmt.name}, the schema of {fmt.hub}: "
                        "check the task's format)") from None

