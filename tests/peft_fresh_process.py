"""Run in a fresh Python process by test_peft_export.py: load exported adapters with PEFT as a user
would, importing only transformers, peft and malora_dist, and save what came out.

    python peft_fresh_process.py JOBS.json RESULTS.pt

JOBS.json: a list of {"name", "base", "adapter", "resaved", "card"}: the base model's directory
(written by ``save_pretrained``), the adapter directory, where to ``save_pretrained`` the loaded
adapter, and whether to also run the Python lines of the adapter's model card.
"""

import json
import re
import sys

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

import malora_dist.peft_method  # noqa: F401  (registers peft_type MALORA_DIST)

PROBE = torch.tensor([[1, 17, 230, 4051, 99, 7, 12, 3000, 512, 42]])
NEW_TOKENS = 5


def card_model(adapter_dir):
    """The model the model card's loading lines build, run as they are written."""
    with open(f"{adapter_dir}/README.md") as f:
        code = re.search(r"```python\n(.*?)```", f.read(), re.S).group(1)
    namespace = {}
    exec(code, namespace)
    return namespace["model"]


def main(jobs_path, results_path):
    torch.set_num_threads(1)
    with open(jobs_path) as f:
        jobs = json.load(f)
    results = {}
    for job in jobs:
        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["adapter"]).eval()
        out = {}
        with torch.no_grad():
            out["logits"] = model(PROBE).logits
            with model.disable_adapter():
                out["disabled"] = model(PROBE).logits
            out["generated"] = model.generate(input_ids=PROBE, attention_mask=torch.ones_like(PROBE),
                                              max_new_tokens=NEW_TOKENS, do_sample=False)
        model.save_pretrained(job["resaved"])
        reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(job["base"]), job["resaved"]).eval()
        with torch.no_grad():
            out["reloaded"] = reloaded(PROBE).logits
            if job["card"]:
                out["card"] = card_model(job["adapter"])(PROBE).logits
        try:
            model.merge_and_unload()
            out["merge"] = "merged"
        except ValueError as err:
            out["merge"] = str(err)
        results[job["name"]] = out
    torch.save(results, results_path)


if __name__ == "__main__":
    main(*sys.argv[1:])
