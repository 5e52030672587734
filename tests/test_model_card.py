"""The model card the export writes beside an adapter (``malora_dist.export.model_card``).

The run directory is the v0.1 fixture's (its config and step-2 checkpoint), with the files a run
and an evaluation leave beside them: ``metrics.jsonl`` with held-out losses, the final adapter and
a sweep's ``eval.json`` naming it. The card's loading lines are run as they are written in
``test_peft_export.py``.
"""

import json
import os
import re
import shutil

import torch
from adapter_support import tiny

from malora_dist.adapters.parameter_count import parameter_report
from malora_dist.commands.export import main
from malora_dist.train.preflight import model_hf_config

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "v0_1_tiny")


def fixture_run(root):
    """``root/point/run``: the fixture's run, as training and a sweep's evaluation leave it."""
    run = os.path.join(root, "point", "run")
    shutil.copytree(FIXTURE, run)
    with open(os.path.join(run, "metrics.jsonl"), "w") as f:
        for row in ({"step": 1, "loss": 9.1}, {"step": 1, "eval_loss": 8.25, "best": True}, {"step": 2, "loss": 8.7},
                    {"step": 2, "eval_loss": 7.5, "best": True}):
            f.write(json.dumps(row) + "\n")
    report = {"tasks": {"cap": {"metric": "multiple_choice", "score": 0.625, "accuracy": 0.625, "n": 8}},
              "adapter": {"path": os.path.abspath(os.path.join(run, "adapter"))}}
    with open(os.path.join(root, "point", "eval.json"), "w") as f:
        json.dump(report, f)
    other = dict(report, adapter={"path": "/elsewhere/adapter"}, tasks={"other": report["tasks"]["cap"]})
    with open(os.path.join(run, "other_eval.json"), "w") as f:
        json.dump(other, f)  # another adapter's report: not this run's
    return run


def test_export_writes_the_model_card(tmp_path):
    run = fixture_run(str(tmp_path))
    out = str(tmp_path / "exported")
    args = ["--config", os.path.join(run, "config.yaml"), "--checkpoint", os.path.join(run, "checkpoints", "step_2"),
            "--out", out]
    assert main(args) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    config = tiny()  # the fixture's run is configs/tiny.yaml
    report = parameter_report(model_hf_config(config), config.adapter)
    for expected in [
        "library_name: peft",
        "# MALoRA adapter of a randomly initialised llama model",
        "exported from step 2 of its run",
        "randomly initialised from `model.config` with seed 0: model_type=llama, hidden_size=64",
        "- method: malora (`peft_type: MALORA_DIST`)",
        "- shared subspace d = 16 (shared, side down), expert rank r̄ = 4",
        "- 4 experts, top-2 routing",
        "- scaling α/r̄ = 2; dropout 0",
        "(12 layers)",
        f"- trainable parameters: {report['trainable_params']:,} ",
        "- exported step: 2 (the run was configured for 2 steps)",
        "- task `capitals`: paths=['synthetic:capitals']",
        "| 1 | 8.2500 |\n| 2 | 7.5000 |",
        f"Evaluation of this run's final adapter (`{os.path.join(str(tmp_path), 'point', 'eval.json')}`)",
        "| cap | multiple_choice | 8 | 0.6250 |",
        "python -m malora_dist.commands.export " + " ".join(args),
    ]:
        assert expected in card, expected
    assert "| other |" not in card and report["trainable_params"] == 37_376

    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)  # run as written in test_peft_export.py
    assert code.startswith("import malora_dist.peft_method") and f"PeftModel.from_pretrained(base, {out!r})" in code
    assert f"load_run_config({os.path.join(run, 'config.yaml')!r})" in code


def test_an_earlier_step_gets_no_final_evaluation_and_no_later_losses(tmp_path):
    run = fixture_run(str(tmp_path))
    os.rename(os.path.join(run, "checkpoints", "step_2"), os.path.join(run, "checkpoints", "step_1"))
    meta_path = os.path.join(run, "checkpoints", "step_1", "meta.json")
    with open(meta_path) as f:
        meta = json.load(f)
    with open(meta_path, "w") as f:
        json.dump(dict(meta, step=1), f)  # what step 1's checkpoint would say
    out = str(tmp_path / "exported")
    assert main(["--config", os.path.join(run, "config.yaml"), "--checkpoint", os.path.join(run, "checkpoints",
                 "step_1"), "--out", out]) == 0
    card = (tmp_path / "exported" / "README.md").read_text()
    assert "| 1 | 8.2500 |" in card and "7.5000" not in card and "Evaluation of this run's final adapter" not in card


def test_a_base_named_by_its_directory_loads_as_the_card_says(tmp_path):
    """A base given by ``model.name_or_path`` alone: the card's lines are transformers' and PEFT's,
    run here as written, and give the package's model."""
    from reference import randomize_adapter_
    from tiny_models import tiny_llama
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from transformers import AutoConfig, PreTrainedTokenizerFast

    from malora_dist.adapters.inject import adapter_layers, inject_adapters
    from malora_dist.export.model_card import write_model_card
    from malora_dist.parallel.adapter_files import load_adapter, save_adapter

    base_dir, out = str(tmp_path / "base"), str(tmp_path / "adapter")
    tiny_llama(seed=1).save_pretrained(base_dir)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"[UNK]": 0, "Paris": 1}, unk_token="[UNK]")),
                            unk_token="[UNK]").save_pretrained(base_dir)
    config = tiny(f"model.name_or_path={base_dir}", "model.config=null", "model.tokenizer=null",
                  "adapter.method=molora", "adapter.rank=2", "adapter.target_modules=[q_proj,up_proj]")
    model = inject_adapters(tiny_llama(seed=1), config.adapter)
    generator = torch.Generator().manual_seed(0)
    for _, layer in adapter_layers(model):
        randomize_adapter_(layer, generator)
    save_adapter(model, out, config.adapter, base_model_name_or_path=base_dir)
    write_model_card(out, config, AutoConfig.from_pretrained(base_dir), 3, None, None, "the command")
    card = (tmp_path / "adapter" / "README.md").read_text()
    assert f"base_model: {base_dir}" in card and "```bash\nthe command\n```" in card
    code = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "malora_dist.train" not in code  # transformers and PEFT alone load this base
    namespace = {}
    exec(code, namespace)
    ids = torch.tensor([[1, 5, 9, 33, 7, 2]])
    with torch.no_grad():
        expected = load_adapter(tiny_llama(seed=1), out).eval()(ids).logits
        torch.testing.assert_close(namespace["model"](ids).logits, expected, rtol=0, atol=1e-5)
    assert namespace["tokenizer"]("Paris")["input_ids"] == [1]
