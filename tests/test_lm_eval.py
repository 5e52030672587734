"""lm-evaluation-harness with the registered ``malora`` model type, offline, on tasks defined on
local files that the test writes: a multiple-choice task made of the items ``launch/evaluate.py``
scored (same accuracy, per-option log-likelihoods within 1e-4) and a generation task; the same
under torchrun (lm-eval splits the requests over 2 ranks). The shipped task configs/lm_eval/demo_capitals
runs as shipped and starts with the same items, with the same scores."""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
from adapter_support import write_random_adapter
from training_support import REPO, TINY

LIMIT = 6
TOL = 1e-4
OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

MC_TASK = """task: malora_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: options
doc_to_target: gold
target_delimiter: ""
metric_list:
  - metric: acc
"""
GEN_TASK = """task: malora_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: target
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
  do_sample: false
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The adapter, evaluate.py's report on LIMIT capitals items, and lm-eval tasks of the same items."""
    from malora_dist.commands.evaluate import main

    root = tmp_path_factory.mktemp("lm_eval")
    adapter = str(root / "adapter")
    write_random_adapter(adapter)
    assert main(["--config", TINY, "--adapter", adapter, "--task", "mc=synthetic:capitals:text",
                 "--limit", str(LIMIT), "--output", str(root / "evaluate.json")]) == 0
    report = json.loads((root / "evaluate.json").read_text())["tasks"]["mc"]
    tasks = root / "tasks"
    tasks.mkdir()
    docs = [{"prompt": e["prompt"], "options": e["options"], "gold": e["options"].index(e["answer"])}
            for e in report["examples"]]
    (tasks / "mc.json").write_text(json.dumps(docs))
    (tasks / "gen.json").write_text(json.dumps([{"prompt": "Question: What is 2 + 2?\nAnswer:", "target": " 4"},
                                                {"prompt": "The capital of France is", "target": " Paris"}]))
    (tasks / "mc.yaml").write_text(MC_TASK.format(data=tasks / "mc.json"))
    (tasks / "gen.yaml").write_text(GEN_TASK.format(data=tasks / "gen.json"))
    # its data path is relative to the repo
    shutil.copy(os.path.join(REPO, "configs", "lm_eval", SHIPPED_TASK + ".yaml"), tasks)
    return root, adapter, report


SHIPPED_TASK = "demo_capitals"


def run_lm_eval(setup, name, launcher, tasks=("malora_mc", "malora_gen")):
    root, adapter, _ = setup
    out = root / name
    done = subprocess.run(
        launcher + ["-m", "malora_dist.commands.lm_eval", "--model", "malora", "--model_args",
                    f"config={TINY},adapter={adapter}", "--tasks", ",".join(tasks), "--include_path",
                    str(root / "tasks"), "--batch_size", "4", "--log_samples", "--output_path", str(out)],
        capture_output=True, text=True, cwd=REPO, timeout=600, env={**os.environ, **OFFLINE})
    assert done.returncode == 0, done.stderr[-3000:]
    samples = {}
    for task in tasks:
        (path,) = glob.glob(str(out / "*" / f"samples_{task}_*.jsonl"))
        with open(path) as f:
            samples[task] = sorted((json.loads(line) for line in f), key=lambda s: s["doc_id"])
    (results,) = glob.glob(str(out / "*" / "results_*.json"))
    with open(results) as f:
        return samples, json.load(f)["results"]


def check_against_evaluate(report, samples, results):
    assert len(samples["malora_mc"]) == LIMIT
    for example, sample in zip(report["examples"], samples["malora_mc"]):
        lm_eval_scores = [float(resp[0]) for resp in sample["filtered_resps"]]
        assert lm_eval_scores == pytest.approx(example["scores"], abs=TOL), example["prompt"]
        assert sample["acc"] == float(example["correct"])
    assert results["malora_mc"]["acc,none"] == pytest.approx(report["accuracy"])
    assert len(samples["malora_gen"]) == 2
    assert all(isinstance(s["filtered_resps"][0], str) for s in samples["malora_gen"])
    assert "exact_match,none" in results["malora_gen"]


@pytest.mark.slow
def test_one_process_matches_evaluate(setup):
    check_against_evaluate(setup[2], *run_lm_eval(setup, "single", [sys.executable]))


@pytest.mark.slow
def test_torchrun_splits_requests_and_matches(setup):
    check_against_evaluate(setup[2], *run_lm_eval(
        setup, "torchrun", [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]))


@pytest.mark.slow
def test_shipped_demo_capitals_task_runs_and_matches(setup):
    """All 60 held-out capitals items; the first LIMIT are the items and scores of evaluate.py."""
    report = setup[2]
    samples, results = run_lm_eval(setup, "shipped", [sys.executable], tasks=(SHIPPED_TASK,))
    shipped = samples[SHIPPED_TASK]
    assert len(shipped) == 60
    for example, sample in zip(report["examples"], shipped[:LIMIT]):
        assert sample["doc"]["prompt"] == example["prompt"] and sample["doc"]["options"] == example["options"]
        assert [float(r[0]) for r in sample["filtered_resps"]] == pytest.approx(example["scores"], abs=TOL)
    assert 0 <= results[SHIPPED_TASK]["acc,none"] <= 1


def test_bad_model_args_name_the_key(tmp_path):
    from malora_dist.evaluation.lm_eval_model import MaloraLM

    with pytest.raises(ValueError, match=r"adapter='/nonexistent' \(--model_args\) is not a directory"):
        MaloraLM(config=TINY, adapter="/nonexistent")
    with pytest.raises(ValueError, match="takes config=RUN_CONFIG and adapter=DIR, not pretrained="):
        MaloraLM(config=TINY, pretrained="gpt2")
