"""``data.tasks[].eval_only``: a suite's test-only task (the paper's inter-domain GSM8K) is read,
prompted and scored, and never trained on; a training-only task (MetaMathQA) is trained on and
not scored. Hub tasks read the hand-written fixtures of tests/fixtures/datasets through
``data.local_dir``; the eval-only task's directory has no train.jsonl at all, so reading its
training split would fail."""

import os
import shutil

import pytest

from malora_dist.data import DataConfig, build_multitask_data
from malora_dist.data.records import DataError
from malora_dist.evaluation import load_eval_tasks

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "datasets")
TASKS = [
    {"name": "arc", "hub": "allenai/ai2_arc", "hub_config": "ARC-Easy", "format": "arc", "eval_split": "test"},
    {"name": "metamathqa", "hub": "meta-math/MetaMathQA", "format": "metamathqa"},
    {"name": "gsm8k", "hub": "openai/gsm8k", "hub_config": "main", "format": "gsm8k", "eval_only": True,
     "eval_split": "test"},
]
MIXINGS = {"proportional": {}, "uniform": {}, "temperature": {"temperature": 2.0}}


@pytest.fixture(scope="module")
def tokenizer():
    from malora_dist.models import smollm2_gguf_path
    from malora_dist.train.build import _cached_tokenizer

    return _cached_tokenizer(smollm2_gguf_path())


@pytest.fixture
def local_dir(tmp_path):
    copies = {"arc": ("arc", ["train", "test"]), "metamathqa": ("metamathqa", ["train"]),
              "gsm8k": ("gsm8k", ["test"])}  # no gsm8k/train.jsonl: it must never be read
    for task, (fmt, splits) in copies.items():
        os.makedirs(tmp_path / task)
        for split in splits:
            shutil.copy(os.path.join(FIXTURES, fmt, f"{split}.jsonl"), tmp_path / task / f"{split}.jsonl")
    return str(tmp_path)


def rows(fmt, split):
    with open(os.path.join(FIXTURES, fmt, f"{split}.jsonl")) as f:
        return sum(1 for line in f if line.strip())


def config(local_dir, mixing="proportional", tasks=TASKS):
    return DataConfig.from_dict({"tasks": tasks, "local_dir": local_dir, "seq_len": 256, "packing": False,
                                 "mixing": mixing, **MIXINGS[mixing]})


@pytest.mark.parametrize("mixing", MIXINGS)
def test_eval_only_task_is_held_out_only(tokenizer, local_dir, mixing):
    built = build_multitask_data(config(local_dir, mixing), tokenizer, seed=0)
    gsm8k = built.stats["gsm8k"]
    assert (gsm8k.records, gsm8k.examples, gsm8k.sequences) == (0, 0, 0)
    assert gsm8k.eval_examples == len(built.eval_examples["gsm8k"]) == rows("gsm8k", "test")
    assert built.mixing[2] == 0.0 and sum(built.mixing[:2]) == pytest.approx(1.0)
    assert built.stats["arc"].examples == rows("arc", "train")
    assert built.stats["metamathqa"].examples == rows("metamathqa", "train")
    sampler = built.sampler(global_batch_size=2)
    assert sampler.per_epoch[2] == 0 and sum(sampler.per_epoch) == sampler.epoch_size > 0
    trained = {built.train.examples[i].task_id for step in range(6) for seq in sampler.global_batch(step)
               for i in built.train.sequences[seq]}
    assert trained == {0, 1}


def test_without_eval_only_the_training_split_is_read(tokenizer, local_dir):
    """The counter-test: the same task trained on reads gsm8k/train.jsonl, which is absent."""
    tasks = [*TASKS[:2], {k: v for k, v in TASKS[2].items() if k != "eval_only"}]
    with pytest.raises(DataError, match=r"gsm8k.*train\.jsonl"):
        build_multitask_data(config(local_dir, tasks=tasks), tokenizer, seed=0)


def test_evaluation_scores_eval_only_and_skips_training_only_tasks(tokenizer, local_dir):
    tasks = load_eval_tasks(config(local_dir), tokenizer, seed=0)
    assert [t.name for t in tasks] == ["arc", "gsm8k"]  # metamathqa has no held-out set
    assert len(tasks[1].examples) == rows("gsm8k", "test") and tasks[1].style == "generation"
    assert len(tasks[0].examples) == rows("arc", "test")
