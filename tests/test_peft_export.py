"""Trained adapters outside the trainer: the session's short runs (``trained_runs``: MALoRA and
MoLoRA at ep=2, LoRA at dp=2, two real processes on gloo) exported with ``python -m
malora_dist.commands.export`` load with ``PeftModel.from_pretrained`` in a fresh Python process that imports
only transformers, peft and malora_dist (``peft_fresh_process.py``), into the base saved with
``save_pretrained`` and read back with ``AutoModelForCausalLM.from_pretrained``.

The reference is the package's own evaluation model (``build_eval_model``, the loading path of
``launch/evaluate.py``: the tensor-parallel base with the adapter loaded by ``load_adapter``).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from training_support import TRAINED_RUNS
from world import run_world

from malora_dist.commands.export import main as export_main
from malora_dist.config.run import load_run_config
from malora_dist.models import build_tiny_causal_lm
from malora_dist.parallel.adapter_files import adapter_state, load_adapter

pytestmark = pytest.mark.slow
HERE = os.path.dirname(os.path.abspath(__file__))
LOGIT_TOL = 1e-5  # fp32
FINAL_STEP = {"malora_ep2": 4, "molora_ep2": 4, "lora_dp2": 2}


PROBE = [[1, 17, 230, 4051, 99, 7, 12, 3000, 512, 42]]  # the probe of peft_fresh_process.py


def package_outputs(runs, adapters, generated):
    """In a one-process world (the evaluation model's tensor-parallel base needs process groups):
    per run, ``launch/evaluate.py``'s model's logits on the probe, with and without the adapter,
    and its greedy choice after each prefix of PEFT's generated sequence."""
    from malora_dist.inference.model import build_eval_model
    from malora_dist.runtime.groups import ParallelGroups

    groups = ParallelGroups.build(1, 1)
    out = {}
    for name, adapter in adapters.items():
        config = load_run_config(os.path.join(runs, name, "config.yaml"))
        model = build_eval_model(config, groups, torch.device("cpu"), adapter)
        base = build_eval_model(config, groups, torch.device("cpu"))
        sequence = generated[name]
        with torch.no_grad():
            out[name] = {"logits": model(torch.tensor(PROBE)), "base": base(torch.tensor(PROBE)),
                         "greedy": [model(sequence[:, :p])[0, -1].argmax().item()
                                    for p in range(len(PROBE[0]), sequence.shape[1])]}
    return out


@pytest.fixture(scope="module")
def loaded(trained_runs, tmp_path_factory):
    """Export each run's last checkpoint and load it in a fresh process: (runs, jobs, the fresh
    process's results, the package's outputs)."""
    root = tmp_path_factory.mktemp("peft_export")
    config = load_run_config(os.path.join(trained_runs, "lora_dp2", "config.yaml"))
    base_dir = str(root / "base")
    build_tiny_causal_lm(config.model.config, seed=config.train.seed).save_pretrained(base_dir)
    jobs = {}
    for name in TRAINED_RUNS:
        run = os.path.join(trained_runs, name)
        adapter = str(root / name)
        assert export_main(["--config", os.path.join(run, "config.yaml"), "--checkpoint",
                            os.path.join(run, "checkpoints", f"step_{FINAL_STEP[name]}"), "--out", adapter]) == 0
        jobs[name] = {"name": name, "base": base_dir, "adapter": adapter, "resaved": str(root / f"{name}_resaved"),
                      "card": True}
    (root / "jobs.json").write_text(json.dumps(list(jobs.values())))
    done = subprocess.run([sys.executable, os.path.join(HERE, "peft_fresh_process.py"), str(root / "jobs.json"),
                           str(root / "results.pt")], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    results = torch.load(str(root / "results.pt"))
    assert torch.equal(results["lora_dp2"]["generated"][:, :len(PROBE[0])], torch.tensor(PROBE))
    package = run_world(1, package_outputs, trained_runs, {n: j["adapter"] for n, j in jobs.items()},
                        {n: r["generated"] for n, r in results.items()})[0]
    return trained_runs, jobs, results, package


@pytest.mark.parametrize("name", list(TRAINED_RUNS))
def test_peft_in_a_fresh_process_gives_the_evaluation_model_logits(loaded, name):
    _, _, results, package = loaded
    result, ours = results[name], package[name]
    gap = (result["logits"] - ours["logits"]).abs().max().item()
    print(f"{name}: max |PEFT - package| logit difference {gap:.3g}")
    assert gap <= LOGIT_TOL
    assert (ours["logits"] - ours["base"]).abs().max() > 1e-3  # the trained adapter changes the output
    assert (result["disabled"] - ours["base"]).abs().max() <= LOGIT_TOL  # disable_adapter gives the base
    assert (result["card"] - ours["logits"]).abs().max() <= LOGIT_TOL  # the model card's lines, run as written


@pytest.mark.parametrize("name", list(TRAINED_RUNS))
def test_generate_continues_as_the_evaluation_model_would(loaded, name):
    """Greedy decoding with PEFT's KV cache picks the tokens the package's model picks from the
    whole prefix."""
    _, _, results, package = loaded
    generated = results[name]["generated"][0, len(PROBE[0]):].tolist()
    assert len(generated) == 5 and generated == package[name]["greedy"]


@pytest.mark.parametrize("name", list(TRAINED_RUNS))
def test_save_pretrained_round_trips_and_the_package_still_loads_it(loaded, name):
    runs, jobs, results, _ = loaded
    job = jobs[name]
    exported, resaved = (load_file(os.path.join(job[d], "adapter_model.safetensors")) for d in ("adapter", "resaved"))
    assert exported.keys() == resaved.keys()
    for key, value in exported.items():
        assert torch.equal(resaved[key], value), key
    assert torch.equal(results[name]["reloaded"], results[name]["logits"])
    # the export, PEFT's copy and the training run's own final adapter hold the same tensors
    config = load_run_config(os.path.join(runs, name, "config.yaml"))
    states = [adapter_state(load_adapter(build_tiny_causal_lm(config.model.config, seed=0), d))
              for d in (job["adapter"], job["resaved"], os.path.join(runs, name, "adapter"))]
    for state in states[1:]:
        assert state.keys() == states[0].keys() and all(torch.equal(state[k], states[0][k]) for k in state)
    if config.adapter.is_moe:  # trained at ep=2: every expert of every layer, by global index
        assert config.parallel.ep == 2 and any(".experts.3." in k for k in states[0])


def test_merge_is_refused_for_the_mixtures_with_the_reason(loaded):
    _, _, results, _ = loaded
    for name in ("malora_ep2", "molora_ep2"):
        assert results[name]["merge"].startswith("a mixture of LoRA experts cannot be merged into the base weights")
    assert results["lora_dp2"]["merge"] == "merged"  # PEFT's own LoRA merges


def test_model_cards_name_the_method_and_the_held_out_losses(loaded):
    runs, jobs, _, _ = loaded
    cards = {name: open(os.path.join(job["adapter"], "README.md")).read() for name, job in jobs.items()}
    assert "# MoLoRA adapter of" in cards["molora_ep2"] and "# LoRA adapter of" in cards["lora_dp2"]
    assert "import malora_dist.peft_method" not in cards["lora_dp2"]  # PEFT's own LoRA needs no registration
    with open(os.path.join(runs, "molora_ep2", "metrics.jsonl")) as f:
        held_out = [json.loads(line) for line in f if "eval_loss" in line]
    assert [r["step"] for r in held_out] == [2, 4]
    for row in held_out:
        assert f"| {row['step']} | {row['eval_loss']:.4f} |" in cards["molora_ep2"]
    assert "None recorded in the run directory." in cards["malora_ep2"]
