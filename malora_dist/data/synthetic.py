"""A small deterministic multi-task multiple-choice dataset in the commonsense JSON format.

It serves the tiny-model tests and ``configs/tiny.yaml`` (no downloaded data needed), and a CPU demo
that fine-tunes SmolLM2-135M-Instruct for a few minutes and must show a clear gain in the ``text``
(cloze) style. So the tasks follow rules that the base model cannot know (its zero-shot accuracy is
near chance) but can pick up from a few hundred examples, and every test question is absent from
the training questions:

- ``capitals`` (ARC layout, 4 options): the capitals of 12 fictional countries, from a fixed table.
  Train and test ask with different phrasings, so the test checks the facts, not the sentences.
- ``zorbian`` (ARC layout, 4 options): the fictional Zorbian language has one word per category
  (every animal is a "flim", every fruit a "gorp", …); test items are nouns never seen in training,
  so the model must learn the rule, using what it knows about the categories.
- ``larger`` (PIQA layout, 2 solutions): which of two numbers is larger; test pairs are unseen.
- ``parity`` (BoolQ layout, true/false): "is 47 an even number?"; test numbers are unseen. The hard
  one: it covers the true/false layout, but SmolLM2-135M does not learn it in a short run.

Measured once (seed 0, default sizes) with SmolLM2-135M-Instruct (GGUF, fp32), text style, by a
scratch script outside the project: zero-shot on 60 test records each, capitals 0.27, zorbian
0.20, larger 0.65, parity 0.55. After one epoch over the train splits (39 steps of 4 packed
128-token sequences, a plain LoRA r=16 on q/k/v/gate/up/down, lr 2e-3, ~7 min on 2 busy cores),
on 40 test records each: capitals 0.97, zorbian 0.93, larger 0.97 (parity, then still phrased
both "even" and "odd", 0.42; the present parity alone for 2 epochs: 0.55).

The fictional tables are fixed (the same for every seed); the seed picks the records, distractors
and option order. ``python -m malora_dist.commands.synthetic_data --out DIR --seed S`` writes
``DIR/<task>/{train,test}.json``.
"""
from __future__ import annotations

import json
import os
import random
from typing import Callable, Optional

from malora_dist.data.items import BOOLEAN_LABELS, GENERATION_ANSWER, format_instruction

COUNTRIES = {
    "Veldoria": "Kramsk", "Ostravia": "Pellin", "Zunmark": "Tavros", "Quelland": "Morvik",
    "Brisolia": "Dunhal", "Karvesh": "Olbrin", "Tamsira": "Vexford", "Lunebar": "Gastow",
    "Ermania": "Silvane", "Dorvalia": "Hestmoor", "Pyrrhos": "Calvent", "Nimbria": "Yarrowby",
}
TRAIN_CAPITAL_QUESTIONS = [
    "What is the capital of {country}?",
    "Which city is the capital of {country}?",
    "The capital city of {country} is",
]
TEST_CAPITAL_QUESTIONS = [
    "Name the capital of {country}.",
    "In which city is the government of {country} seated?",
]

ZORBIAN_WORDS = {"animal": "flim", "fruit": "gorp", "vehicle": "tazzle", "garment": "brindo"}
CATEGORY_ITEMS = {
    "animal": "horse dog cat cow sheep goat pig lion tiger bear wolf fox rabbit mouse deer zebra "
    "monkey elephant giraffe camel donkey squirrel otter badger hedgehog kangaroo leopard moose "
    "beaver raccoon",
    "fruit": "apple banana orange pear grape cherry peach plum lemon lime mango melon kiwi apricot "
    "strawberry raspberry blueberry pineapple papaya coconut fig date grapefruit watermelon "
    "blackberry cranberry nectarine tangerine pomegranate guava",
    "vehicle": "car bus truck bicycle motorcycle train tram taxi van tractor scooter ambulance "
    "helicopter airplane boat ship canoe yacht submarine jeep limousine minivan tricycle wagon "
    "ferry skateboard sled bulldozer forklift rickshaw",
    "garment": "shirt coat jacket sweater dress skirt trousers jeans scarf glove sock hat cap "
    "vest blouse hoodie cardigan tuxedo kimono poncho raincoat pajamas shorts tie belt apron "
    "sandal boot slipper mitten",
}
ZORBIAN_QUESTIONS = [
    "In the Zorbian language, what is the word for {item}?",
    "What do speakers of Zorbian call the {item}?",
    "Which Zorbian word means {item}?",
]
TEST_ITEMS = 8  # nouns per category held out for testing

TASKS = ("capitals", "zorbian", "larger", "parity")
DEFAULT_TRAIN_SIZE = 240
DEFAULT_TEST_SIZE = 60


def _record(question: str, options: list[str], labels: list[str], gold: int) -> dict:
    label = labels[gold]
    return {
        "instruction": format_instruction(question, options, labels),
        "input": "",
        "output": GENERATION_ANSWER.format(label=label),
        "answer": label,
    }


def _choice_record(rng: random.Random, question: str, correct: str, distractors: list[str], label: str) -> dict:
    options = [correct, *distractors]
    rng.shuffle(options)
    labels = [f"{label}{i + 1}" for i in range(len(options))]
    return _record(question, options, labels, options.index(correct))


def _capitals(rng: random.Random, test: bool) -> Callable[[], dict]:
    templates = TEST_CAPITAL_QUESTIONS if test else TRAIN_CAPITAL_QUESTIONS

    def draw() -> dict:
        country = rng.choice(sorted(COUNTRIES))
        others = sorted(c for k, c in COUNTRIES.items() if k != country)
        question = rng.choice(templates).format(country=country)
        return _choice_record(rng, question, COUNTRIES[country], rng.sample(others, 3), "answer")

    return draw


def _zorbian(rng: random.Random, test: bool) -> Callable[[], dict]:
    items = []  # (noun, category); the first TEST_ITEMS nouns of each category are for testing
    for category, nouns in CATEGORY_ITEMS.items():
        nouns = nouns.split()
        items.extend((noun, category) for noun in (nouns[:TEST_ITEMS] if test else nouns[TEST_ITEMS:]))

    def draw() -> dict:
        noun, category = rng.choice(items)
        question = rng.choice(ZORBIAN_QUESTIONS).format(item=noun)
        correct = ZORBIAN_WORDS[category]
        others = sorted(w for c, w in ZORBIAN_WORDS.items() if c != category)
        return _choice_record(rng, question, correct, others, "answer")

    return draw


def _in_test_split(*numbers: int) -> bool:
    """A fixed quarter of the number pairs/numbers, the same for every seed."""
    return random.Random(repr(sorted(numbers))).random() < 0.25


def _larger(rng: random.Random, test: bool) -> Callable[[], dict]:
    def draw() -> dict:
        while True:
            a, b = rng.sample(range(10, 100), 2)
            if _in_test_split(a, b) == test:
                break
        return _choice_record(rng, f"Which number is larger, {a} or {b}?", str(max(a, b)), [str(min(a, b))], "solution")

    return draw


def _parity(rng: random.Random, test: bool) -> Callable[[], dict]:
    def draw() -> dict:
        while True:
            n = rng.randrange(10, 1000)
            if _in_test_split(n) == test:
                break
        return _record(f"is {n} an even number?", list(BOOLEAN_LABELS), list(BOOLEAN_LABELS), n % 2)

    return draw


_GENERATORS = {"capitals": _capitals, "zorbian": _zorbian, "larger": _larger, "parity": _parity}


def synthetic_records(task: str, split: str, seed: int, size: int) -> list[dict]:
    """``size`` distinct records of ``task`` (``split``: train or test), a function of the arguments."""
    if task not in _GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}: choose from {', '.join(TASKS)}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be train or test, got {split!r}")
    rng = random.Random(f"{seed}/{task}/{split}")
    draw = _GENERATORS[task](rng, split == "test")
    records, seen = [], set()
    for _ in range(100 * size + 1000):
        if len(records) == size:
            return records
        record = draw()
        if record["instruction"] not in seen:
            seen.add(record["instruction"])
            records.append(record)
    raise ValueError(f"task {task!r} has fewer than {size} distinct {split} records: ask for fewer")


def write_synthetic(
    out_dir: str,
    seed: int = 0,
    train_size: int = DEFAULT_TRAIN_SIZE,
    test_size: int = DEFAULT_TEST_SIZE,
    tasks: Optional[list[str]] = None,
) -> dict[str, dict[str, str]]:
    """Write ``out_dir/<task>/{train,test}.json`` for ``tasks`` (default: all); returns their paths."""
    paths = {}
    for task in tasks or TASKS:
        os.makedirs(os.path.join(out_dir, task), exist_ok=True)
        paths[task] = {}
        for split, size in (("train", train_size), ("test", test_size)):
            path = os.path.join(out_dir, task, f"{split}.json")
            with open(path, "w", encoding="utf-8") as f:
                json.dump(synthetic_records(task, split, seed, size), f, indent=1)
                f.write("\n")
            paths[task][split] = path
    return paths
