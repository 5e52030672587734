"""The paper recipes (configs/paper_{inter,intra}_*.yaml) hold the values of the paper's Tables 8–9.

The expected values are read from ``tests/fixtures/paper_tables.md`` (the paper's tables as it prints
them), not written in this file: its hyper-parameter table (lr, epochs, batch size, dropout / weight
decay / warm-up, β, hardware), its ranks-and-α line, the experts and top-k, the balance-loss
coefficient of the tables and the tables' target list. Every paper config found by glob is checked
(configs/paper_{inter,intra}_<method>.yaml and the inter-domain ablations of configs/ablations/), so
recipes added later are covered too.
"""

import glob
import os
import re

import pytest
import yaml

from malora_dist.config.adapter import AdapterConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(REPO, "tests", "fixtures", "paper_tables.md")
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "paper_*.yaml"))) + sorted(
    glob.glob(os.path.join(REPO, "configs", "ablations", "*.yaml")))
SUITES = {"inter": 0, "intra": 1}  # column of the hyper-parameter table
PROJECTIONS = {"Q": "q_proj", "K": "k_proj", "V": "v_proj", "O": "o_proj", "Up": "up_proj",
               "Down": "down_proj", "Gate": "gate_proj"}


def _key(name):
    """A method's name as a config file names it: "MALoRA-Small" → "malorasmall"."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@pytest.fixture(scope="module")
def paper():
    text = open(PAPER, encoding="utf-8").read()
    table = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and line.startswith("|"):
            table[cells[0]] = cells[1:]
    values = {suite: {} for suite in SUITES}
    for suite, col in SUITES.items():
        values[suite]["lr"] = float(table["learning rate"][col])
        values[suite]["epochs"] = float(table["epochs"][col])
        values[suite]["batch"] = int(table["batch size"][col])
        dropout, decay, warmup = (float(v) for v in table["dropout / weight decay / warm-up ratio"][col].split("/"))
        values[suite].update(dropout=dropout, weight_decay=decay, warmup=warmup)
        values[suite]["beta"] = float(table["β"][col])
        values[suite]["gpus"] = int(re.match(r"(\d+)×", table["hardware"][col]).group(1))
    ranks = {}
    line = re.search(r"Ranks and α: (.*?)\. (\d+) experts, top-(\d+)", text, re.S)
    for part in line.group(1).replace("\n", " ").split(";"):
        names, _, spec = part.strip().partition(" r")  # "LoRA and DoRA", "=64, α=128"
        fields = dict(re.findall(r"(r̄|r|d|α)=(\d+)", "r" + spec))
        for name in names.split(" and "):
            ranks[_key(name)] = {k: int(v) for k, v in fields.items()}
    experts, top_k = int(line.group(2)), int(line.group(3))
    coef = float(re.search(r"coefficient ([\d.]+) in the hyperparameter tables", text).group(1))
    listed = re.search(r"the tables list ([^(]+?) \(", text).group(1)
    targets = {PROJECTIONS[p.strip()] for p in listed.split(",")}
    return dict(values=values, ranks=ranks, experts=experts, top_k=top_k, balance=coef, targets=targets)


def test_paper_facts_were_read(paper):
    """The parser found what the checks below need (a changed paper_tables.md fails here, not silently)."""
    assert set(paper["ranks"]) >= {"lora", "dora", "asylora", "molora", "malora", "malorasmall"}
    assert paper["ranks"]["malora"].keys() == {"r̄", "d", "α"} and paper["ranks"]["lora"].keys() == {"r", "α"}
    assert paper["experts"] > 1 and paper["top_k"] >= 1 and len(paper["targets"]) == 6
    assert all(len(v) == 8 for v in paper["values"].values())


def test_every_base_recipe_exists():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {f"paper_{s}_{m}.yaml" for s in SUITES for m in ("lora", "molora", "malora")} <= names


def _config(path):
    with open(path, encoding="utf-8") as f:
        header = f.read().split("\nmodel:", 1)[0]
    with open(path, encoding="utf-8") as f:
        return header, yaml.safe_load(f)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_recipe_holds_the_papers_values(paper, path):
    stem = os.path.splitext(os.path.basename(path))[0]
    if os.path.basename(os.path.dirname(path)) == "ablations":  # Table 3: inter-domain
        suite, method_name = "inter", stem
    else:
        suite, _, method_name = stem[len("paper_"):].partition("_")
    assert suite in SUITES, f"{path}: name it paper_inter_<method>.yaml or paper_intra_<method>.yaml"
    want = paper["values"][suite]
    header, raw = _config(path)
    train, data = raw["train"], raw["data"]
    adapter = AdapterConfig.from_dict(raw["adapter"])

    assert train["lr"] == want["lr"] and train["epochs"] == want["epochs"]
    # Batch size in examples per optimizer step: one example per sequence (no packing).
    assert train["global_batch_size"] == want["batch"] and data["packing"] is False
    assert adapter.dropout == want["dropout"]
    assert train["weight_decay"] == want["weight_decay"] and train["warmup_ratio"] == want["warmup"]
    assert set(adapter.target_modules) == paper["targets"]
    world = int(re.search(r"^# World size: (\d+)", header, re.M).group(1))
    assert world == want["gpus"]
    if adapter.method == "malora":
        assert adapter.beta == want["beta"]
    if adapter.is_moe:
        assert (adapter.num_experts, adapter.top_k) == (paper["experts"], paper["top_k"])
        assert adapter.balance_loss_coef == paper["balance"]

    ranks = paper["ranks"].get(_key(method_name))
    if ranks is None:  # Tables 8–9 give no ranks for it (MoAsyLoRA, the ablations): values above only
        return
    if "α" in ranks:
        assert adapter.scaling * adapter.adapter_rank == ranks["α"]  # the effective α, set or defaulted
    if "d" in ranks:
        assert (adapter.d, adapter.r_bar) == (ranks["d"], ranks["r̄"])
    else:
        assert adapter.rank == ranks["r"]
