"""Evaluation (launch/evaluate.py, malora_dist.evaluation) and checkpoint export (malora_dist.export.checkpoint).

Scores are checked against an independent reference: the plain Hugging Face model (with the
adapter loaded by ``load_adapter``), one forward pass per (prompt, option) and a log_softmax sum,
with the tokenizer called directly. One 2-process world evaluates at tp=2, ep=2 and dp=2; the
export tests use the session's short training runs (``trained_runs``: MALoRA at ep=2, LoRA at
dp=2); the single-process evaluation runs through the command line.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from adapter_support import tiny, tiny_hf, write_random_adapter
from training_support import REPO, TINY
from world import run_world

from malora_dist.config.run import load_run_config
from malora_dist.data.synthetic import synthetic_records
from malora_dist.models import load_tokenizer, smollm2_gguf_path

LIMIT = 5
# name -> (synthetic task, style)
TASKS = {"cap": ("capitals", "text"), "larger": ("larger", "label"), "par": ("parity", "generation")}
TASK_SPECS = [f"{name}=synthetic:{task}:{style}" for name, (task, style) in TASKS.items()]
SCORE_TOL = 1e-4
# name -> (world size, parallel section) of the evaluations with the random adapter
LAYOUTS = {"tp2": dict(tp=2), "ep2": dict(ep=2)}


def world_main(adapter_dir):
    from malora_dist.evaluation import evaluate_run, task_configs_from_specs

    reports = {}
    for name, parallel in LAYOUTS.items():
        config = tiny(*(f"parallel.{k}={v}" for k, v in parallel.items()))
        reports[name] = evaluate_run(config, task_configs_from_specs(TASK_SPECS), adapter_dir, LIMIT)
    # The base model on the config's own held-out sets (eval_fraction), examples split over dp=2.
    reports["heldout_dp2"] = evaluate_run(tiny("data.eval_fraction=0.1"), None, None, LIMIT)
    return reports


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("evaluation"))
    adapter_dir = os.path.join(root, "random_adapter")
    write_random_adapter(adapter_dir)
    output = os.path.join(root, "single.json")
    cli = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), "--config", TINY, "--adapter", adapter_dir,
         *[arg for spec in TASK_SPECS for arg in ("--task", spec)], "--limit", str(LIMIT), "--output", output],
        capture_output=True, text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300,
    )
    assert cli.returncode == 0, cli.stderr[-3000:]
    with open(output) as f:
        reports = {"single": json.load(f)}
    reports.update(run_world(2, world_main, adapter_dir)[0])
    return root, adapter_dir, cli.stdout, reports


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(*os.path.split(smollm2_gguf_path()))


def reference_score(model, tokenizer, prompt, option):
    """log p(option | prompt) by one plain forward pass: the option tokenised on its own."""
    prompt_ids = tokenizer(prompt)["input_ids"]
    option_ids = tokenizer(option, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids + option_ids])).logits[0]
    logprobs = torch.log_softmax(logits.double(), dim=-1)
    return sum(logprobs[len(prompt_ids) - 1 + i, t].item() for i, t in enumerate(option_ids))


def check_scores(model, tokenizer, examples):
    for example in examples:
        for option, score in zip(example["options"], example["scores"]):
            assert score == pytest.approx(reference_score(model, tokenizer, example["prompt"], option),
                                          abs=SCORE_TOL), (example["prompt"], option)


@pytest.mark.slow
def test_cli_report_and_table(evaluated):
    _, adapter_dir, stdout, reports = evaluated
    report = reports["single"]
    assert set(report) >= {"tasks", "model", "adapter"}
    assert report["adapter"]["path"] == os.path.abspath(adapter_dir)
    assert list(report["tasks"]) == list(TASKS)
    for name, (task, style) in TASKS.items():
        entry = report["tasks"][name]
        assert entry["style"] == style and entry["n"] == LIMIT == len(entry["examples"])
        assert entry["accuracy"] == sum(e["correct"] for e in entry["examples"]) / LIMIT
        # --limit takes the first records of the file, in order
        assert [e["where"] for e in entry["examples"]] == [f"synthetic:{task}[test] record {i}"
                                                           for i in range(1, LIMIT + 1)]
        assert any(line.split()[:3] == [name, style, str(LIMIT)] for line in stdout.splitlines())


@pytest.mark.slow
def test_multiple_choice_scores_match_hf(evaluated, tokenizer):
    _, adapter_dir, _, reports = evaluated
    model = tiny_hf(adapter_dir)
    for name, (task, style) in TASKS.items():
        if style == "generation":
            continue
        records = synthetic_records(task, "test", 0, LIMIT)
        examples = reports["single"]["tasks"][name]["examples"]
        check_scores(model, tokenizer, examples[:2])
        for example, record in zip(examples, records):
            scores = example["scores"]
            assert example["prediction"] == example["options"][scores.index(max(scores))]
            assert example["correct"] == (example["prediction"] == example["answer"])
            if style == "label":
                assert example["answer"] == " " + record["answer"]
    # the adapter changes the scores (so a silently skipped adapter would fail the check above)
    base = tiny_hf()
    example = reports["single"]["tasks"]["cap"]["examples"][0]
    assert abs(reference_score(base, tokenizer, example["prompt"], example["options"][0]) - example["scores"][0]) > 1e-2


@pytest.mark.slow
def test_generation_is_greedy_exact_match(evaluated, tokenizer):
    from malora_dist.evaluation.scoring import GENERATION_SLACK

    _, adapter_dir, _, reports = evaluated
    examples = reports["single"]["tasks"]["par"]["examples"]
    records = synthetic_records("parity", "test", 0, LIMIT)
    for example, record in zip(examples, records):
        assert example["options"] == [] and example["answer"] == record["output"]
        assert example["correct"] == (example["prediction"] == record["output"])
    model = tiny_hf(adapter_dir)
    prompt_ids = tokenizer(examples[0]["prompt"], return_tensors="pt")["input_ids"]
    budget = len(tokenizer(" " + records[0]["output"], add_special_tokens=False)["input_ids"]) + GENERATION_SLACK
    out = model.generate(prompt_ids, attention_mask=torch.ones_like(prompt_ids), max_new_tokens=budget,
                         do_sample=False, eos_token_id=tokenizer.eos_token_id)
    text = tokenizer.decode(out[0, prompt_ids.shape[1]:], skip_special_tokens=True).strip()
    assert examples[0]["prediction"] == text


@pytest.mark.slow
@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_layouts_match_single_process(evaluated, layout):
    _, _, _, reports = evaluated
    single, other = reports["single"]["tasks"], reports[layout]["tasks"]
    assert reports[layout]["layout"]["tp" if layout == "tp2" else "ep"] == 2
    for name in TASKS:
        for a, b in zip(other[name]["examples"], single[name]["examples"], strict=True):
            assert a["prompt"] == b["prompt"] and a["prediction"] == b["prediction"], (layout, name)
            assert a["scores"] == pytest.approx(b["scores"], abs=SCORE_TOL), (layout, name)
        assert other[name]["accuracy"] == single[name]["accuracy"]


@pytest.mark.slow
def test_config_heldout_sets_split_over_dp(evaluated, tokenizer):
    from malora_dist.data import build_multitask_data

    _, _, _, reports = evaluated
    report = reports["heldout_dp2"]
    config = tiny("data.eval_fraction=0.1")
    held = build_multitask_data(config.data, tokenizer, config.train.seed).eval_examples
    assert report["adapter"] is None and report["layout"]["dp"] == 2
    assert list(report["tasks"]) == [t.name for t in config.data.tasks]
    for name, entry in report["tasks"].items():
        assert entry["n"] == LIMIT and entry["style"] == "text"
        assert [e["prompt"] for e in entry["examples"]] == [e.prompt for e in held[name][:LIMIT]]
    check_scores(tiny_hf(), tokenizer, report["tasks"]["capitals"]["examples"][:2])


@pytest.mark.parametrize("spec,message", [
    ("no-equals-sign", "must look like NAME=PATH"),
    ("=x.json", "must look like NAME=PATH"),
    ("x=", "must look like NAME=PATH"),
    ("x=:label", "names no file"),
])
def test_bad_task_spec_names_the_argument(spec, message, capsys):
    from malora_dist.commands.evaluate import main

    assert main(["--config", TINY, "--task", spec]) == 2
    err = capsys.readouterr().err
    assert f"--task {spec!r}" in err and message in err


def test_task_errors_name_the_argument(tokenizer, tmp_path):
    from malora_dist.evaluation import load_eval_tasks, task_configs_from_specs

    with pytest.raises(ValueError, match="--task 'a=synthetic:larger'.*twice"):
        task_configs_from_specs(["a=synthetic:capitals", "a=synthetic:larger"])
    missing = str(tmp_path / "missing.json")
    with pytest.raises(ValueError, match=r"^--task: .*missing\.json"):
        load_eval_tasks(tiny().data, tokenizer, 0, task_configs_from_specs([f"x={missing}"]))
    with pytest.raises(ValueError, match="no task has a held-out set.*--task NAME=PATH"):
        load_eval_tasks(tiny().data, tokenizer, 0)  # tiny.yaml has neither eval_paths nor eval_fraction


def test_training_layout_is_fitted_to_the_world():
    from malora_dist.config.adapter import AdapterConfig
    from malora_dist.inference.model import fit_eval_layout

    moe = AdapterConfig(method="malora", rank=4, num_experts=4, lam=1.0)
    lora = AdapterConfig(method="lora", rank=4)
    layout = lambda c: (c.parallel.tp, c.parallel.ep)  # noqa: E731
    assert layout(fit_eval_layout(tiny("parallel.ep=2"), 1, moe)) == (1, 1)
    assert layout(fit_eval_layout(tiny("parallel.ep=4"), 2, moe)) == (1, 2)
    assert layout(fit_eval_layout(tiny("parallel.ep=2"), 2, lora)) == (1, 1)
    assert layout(fit_eval_layout(tiny("parallel.tp=2", "parallel.ep=2"), 3, moe)) == (1, 1)
    assert layout(fit_eval_layout(tiny("parallel.ep=2"), 4, moe)) == (1, 2)  # what fits stays
    pinned = fit_eval_layout(tiny("parallel.ep=2"), 1, moe, frozenset({"parallel.ep"}))
    assert layout(pinned) == (1, 2)


def test_cli_adapts_a_training_layout_but_refuses_one_asked_for(tmp_path, capsys):
    """A config trained at ep=2 evaluates in one process; ``--set parallel.ep=2`` is refused."""
    import yaml

    from malora_dist.commands.evaluate import main

    write_random_adapter(str(tmp_path / "adapter"))
    config = tiny("parallel.ep=2").to_dict()
    (tmp_path / "ep2.yaml").write_text(yaml.safe_dump(config))
    args = ["--adapter", str(tmp_path / "adapter"), "--task", "cap=synthetic:capitals", "--limit", "2"]
    launch_vars = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    before = {key: os.environ.get(key) for key in launch_vars}
    assert main(["--config", str(tmp_path / "ep2.yaml"), *args, "--output", str(tmp_path / "r.json")]) == 0
    # the one-process world is gone, and so are its variables (subprocesses started later would
    # otherwise take themselves for its ranks)
    assert {key: os.environ.get(key) for key in launch_vars} == before
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["layout"] == {"tp": 1, "dp": 1, "ep": 1} and report["tasks"]["cap"]["n"] == 2
    capsys.readouterr()
    assert main(["--config", TINY, *args, "--set", "parallel.ep=2"]) == 2
    assert "parallel.ep=2 must divide dp = world/tp = 1/1 = 1" in capsys.readouterr().err


@pytest.mark.slow
def test_layout_errors_name_the_key(evaluated):
    from malora_dist.evaluation import validate_eval_layout
    from malora_dist.parallel.adapter_files import read_adapter_config

    with pytest.raises(ValueError, match=r"parallel.ep=2 needs a mixture-of-experts adapter.*no --adapter"):
        validate_eval_layout(tiny("parallel.ep=2"), 2, None)
    with pytest.raises(ValueError, match=r"parallel.ep=3 must divide"):
        validate_eval_layout(tiny("parallel.ep=3"), 3, read_adapter_config(evaluated[1]))


@pytest.mark.slow
def test_export_from_ep2_checkpoint_matches_final_adapter(trained_runs, tmp_path):
    from malora_dist.commands.export import main

    run = os.path.join(trained_runs, "malora_ep2")
    out = str(tmp_path / "exported")
    assert main(["--config", os.path.join(run, "config.yaml"), "--checkpoint",
                 os.path.join(run, "checkpoints", "step_4"), "--out", out]) == 0
    probe = torch.tensor([[1, 17, 230, 4051, 99, 7, 12, 3000]])
    with torch.no_grad():
        exported = tiny_hf(out)(probe).logits
        final = tiny_hf(os.path.join(run, "adapter"))(probe).logits
        base = tiny_hf()(probe).logits
    torch.testing.assert_close(exported, final, rtol=0, atol=1e-6)
    assert (final - base).abs().max() > 1e-4  # the trained adapter is not a no-op
    # an earlier checkpoint exports an earlier adapter
    assert main(["--config", os.path.join(run, "config.yaml"), "--checkpoint",
                 os.path.join(run, "checkpoints", "step_2"), "--out", str(tmp_path / "step2")]) == 0
    with torch.no_grad():
        assert (tiny_hf(str(tmp_path / "step2"))(probe).logits - final).abs().max() > 1e-6


@pytest.mark.slow
def test_export_errors(trained_runs, tmp_path, capsys):
    from malora_dist.commands.export import main

    run = os.path.join(trained_runs, "malora_ep2")
    step = os.path.join(run, "checkpoints", "step_4")
    assert main(["--config", os.path.join(run, "config.yaml"), "--checkpoint", os.path.join(run, "checkpoints"),
                 "--out", str(tmp_path / "x")]) == 2
    assert "not a complete checkpoint" in capsys.readouterr().err
    assert main(["--config", os.path.join(run, "config.yaml"), "--set", "adapter.rank=8", "--checkpoint", step,
                 "--out", str(tmp_path / "x")]) == 2
    assert "adapter.rank" in capsys.readouterr().err


@pytest.mark.slow
def test_lora_export_loads_in_peft(trained_runs, tmp_path):
    from peft import PeftModel

    from malora_dist.export.checkpoint import export_checkpoint

    run = os.path.join(trained_runs, "lora_dp2")
    out = str(tmp_path / "lora")
    export_checkpoint(load_run_config(os.path.join(run, "config.yaml")), os.path.join(run, "checkpoints", "step_2"),
                      out)
    probe = torch.tensor([[1, 17, 230, 4051, 99, 7, 12, 3000]])
    with torch.no_grad():
        peft_logits = PeftModel.from_pretrained(tiny_hf(), out).eval()(probe).logits
        ours = tiny_hf(os.path.join(run, "adapter"))(probe).logits
    torch.testing.assert_close(peft_logits, ours, rtol=0, atol=1e-6)


# ---- the real SmolLM2-135M-Instruct --------------------------------------------------------------
SMOLLM2_CONFIG = os.path.join(REPO, "benchmarks", "configs", "eval_smollm2_commonsense.yaml")
SMOLLM2_SPECS = ["capitals=synthetic:capitals", "parity=synthetic:parity:label"]
SMOLLM2_LIMIT = 15


def smollm2_main():
    from malora_dist.evaluation import evaluate_run, task_configs_from_specs

    return evaluate_run(load_run_config(SMOLLM2_CONFIG), task_configs_from_specs(SMOLLM2_SPECS), None, SMOLLM2_LIMIT)


@pytest.mark.slow
def test_smollm2_scores_match_hf(tokenizer):
    from malora_dist.models import load_hf_model

    report = run_world(1, smollm2_main)[0]
    assert report["model"]["gguf_file"] == "smollm2"
    model = load_hf_model(smollm2_gguf_path())
    for name, entry in report["tasks"].items():
        assert entry["n"] == SMOLLM2_LIMIT
        assert entry["accuracy"] == sum(e["correct"] for e in entry["examples"]) / SMOLLM2_LIMIT
        check_scores(model, tokenizer, entry["examples"][:3])
    assert report["tasks"]["parity"]["examples"][0]["options"] == [" true", " false"]
