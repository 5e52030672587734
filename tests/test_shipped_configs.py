"""Every shipped config (``configs/**/*.yaml``, found by glob) runs, in miniature and as a dry run.

Miniature: 2 optimizer steps with the model swapped for a tiny random LLaMA (the real SmolLM2
tokenizer) and every hub task's data swapped for the small hand-written files of
``tests/fixtures/datasets/<format>/`` (each dataset's own hub schema), reached through
``data.local_dir`` as a user's offline copy would be. Everything else the config sets is kept:
adapter, dtype, packing, mixing, batch sizes, schedule, activation checkpointing, expert
placement... Sizes only are shrunk: run length (2 steps instead of epochs), sequence length,
``sample`` sizes (to what a fixture holds), intervals (to 1, so that logging, held-out evaluation
and checkpointing happen within the 2 steps), and the world: a layout keeps its kind (tp, ep and
dp each > 1 stay > 1) at 2 per axis at most. One process world per world size runs all the configs
of that size.

Dry run: ``launch/train.py --dry-run --world-size N`` at the world size the config's header names
(``# World size: N``), on the config as shipped; and every ``--dry-run`` command of the READMEs.

The intra-domain MALoRA recipe is then evaluated as its header says (``launch/evaluate.py``'s
``evaluate_run`` on the trained adapter, the first example of every held-out task). The
inter-domain suite's free-form metrics generate up to 320–384 tokens per example (minutes on these
CPUs); its eval_only tasks are checked at the data level (tests/test_eval_only.py) and its metrics
by tests/test_eval_metrics.py.

Adapter-section files (``configs/adapters/*.yaml``) train in miniature inside configs/tiny.yaml;
lm-evaluation-harness task files (``configs/lm_eval/*.yaml``) are run by tests/test_lm_eval.py.
"""

import copy
import glob
import math
import os
import re
import shlex
import shutil

import pytest
import yaml
from training_support import Record
from world import run_world

from malora_dist.commands import train as cli
from malora_dist.config.adapter import AdapterConfig
from malora_dist.config.run import build_run_config
from malora_dist.train.metrics_log import read_metrics
from malora_dist.train.run import run_training

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True))
FIXTURES = os.path.join(REPO, "tests", "fixtures", "datasets")
TINY = os.path.join(REPO, "configs", "tiny.yaml")
TINY_MODEL = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=4, vocab_size=49152, max_position_embeddings=256,
                  tie_word_embeddings=True)
MAX_SEQ_LEN = 128
STEPS = 2
MAX_PER_AXIS = 2  # the largest tp, ep or dp of a miniature world
EVALUATED = [os.path.join(REPO, "configs", "paper_intra_malora.yaml")]


def _rel(path):
    return os.path.relpath(path, REPO)


def _load(path):
    with open(path, encoding="utf-8") as f:
        return yaml.safe_load(f)


def kind(path):
    """``run`` (a run config), ``adapter`` (an adapter section alone) or ``lm_eval`` (a task file)."""
    raw = _load(path)
    if isinstance(raw, dict) and {"model", "train"} & set(raw):
        return "run"
    if isinstance(raw, dict) and "task" in raw and "output_type" in raw:
        return "lm_eval"
    AdapterConfig.from_dict(raw)  # else it must be a valid adapter section
    return "adapter"


def header_world_size(path):
    header = []
    with open(path, encoding="utf-8") as f:
        for line in f:  # the leading comment block
            if not line.startswith("#"):
                break
            header.append(line)
    header = "".join(header)
    match = re.search(r"^# World size: (\d+)", header, re.M)
    assert match, f"{_rel(path)}: its header comment must name the world size it runs at ('# World size: N')"
    return int(match.group(1))


def _shrink(size):
    return min(size, MAX_PER_AXIS)


def miniature(path, root):
    """(world size, raw config) of ``path``'s miniature run, writing its local data under ``root``."""
    name = os.path.splitext(_rel(path))[0].replace(os.sep, "_")
    if kind(path) == "adapter":
        config, world = _load(TINY), 1
        config["adapter"] = _load(path)
    else:
        config, world = _load(path), header_world_size(path)
    parallel = config.setdefault("parallel", {})
    tp, ep = parallel.get("tp", 1), parallel.get("ep", 1)
    dp = world // tp
    parallel["tp"], parallel["ep"] = _shrink(tp), _shrink(ep)
    mini_dp = max(_shrink(dp), parallel["ep"])
    dtype = config.get("model", {}).get("dtype")
    config["model"] = {"config": dict(TINY_MODEL), "tokenizer": "smollm2", **({"dtype": dtype} if dtype else {})}

    data = config["data"]
    data["seq_len"] = min(data.get("seq_len", 512), MAX_SEQ_LEN)
    local_dir = os.path.join(root, name, "data")
    for task in data["tasks"]:
        if task.get("hub"):
            _copy_fixture(task, local_dir)
            if "sample" in task:  # a seeded sample of what the fixture holds
                task["sample"] = _fixture_rows(task["format"], "train") - 1
    if any(t.get("hub") for t in data["tasks"]):
        data["local_dir"] = local_dir

    train = config["train"]
    train.pop("epochs", None)
    train.update(steps=STEPS, output_dir=os.path.join(root, name, "run"), log_interval=1)
    if train.get("eval_interval"):
        train["eval_interval"] = 1
    checkpoint = config.setdefault("checkpoint", {})
    if checkpoint.get("interval"):
        checkpoint["interval"] = 1
    return parallel["tp"] * mini_dp, config


def _fixture_rows(fmt, split):
    with open(os.path.join(FIXTURES, fmt, f"{split}.jsonl"), encoding="utf-8") as f:
        return sum(1 for line in f if line.strip())


def _copy_fixture(task, local_dir):
    fmt = task.get("format")
    assert fmt and os.path.isdir(os.path.join(FIXTURES, fmt)), (
        f"hub task {task['name']!r} (format {fmt!r}) has no fixture: add tests/fixtures/datasets/{fmt}/"
        "{train,test}.jsonl in the dataset's hub schema")
    target = os.path.join(local_dir, task["name"])
    os.makedirs(target, exist_ok=True)
    for split in ("train", "test"):
        source = os.path.join(FIXTURES, fmt, f"{split}.jsonl")
        if os.path.exists(source):
            shutil.copy(source, os.path.join(target, f"{split}.jsonl"))


RUN_CONFIGS = [p for p in CONFIGS if kind(p) == "run"]
TRAINABLE = [p for p in CONFIGS if kind(p) in ("run", "adapter")]


def test_every_config_is_covered():
    """A new kind of file under configs/ must be taught to this test, not skipped by it."""
    assert CONFIGS and RUN_CONFIGS
    lm_eval_tests = open(os.path.join(REPO, "tests", "test_lm_eval.py"), encoding="utf-8").read()
    for path in CONFIGS:
        if kind(path) == "lm_eval":
            name = os.path.basename(path)
            assert name in lm_eval_tests or os.path.splitext(name)[0] in lm_eval_tests, path


def test_no_shipped_config_names_shared():
    """../shared exists on this project's machines only."""
    for path in CONFIGS:
        with open(path, encoding="utf-8") as f:
            assert "../shared" not in f.read(), f"{_rel(path)} names ../shared"


@pytest.mark.parametrize("path", RUN_CONFIGS, ids=_rel)
def test_dry_run_at_header_world_size(path, capsys):
    world = header_world_size(path)
    assert cli.main(["--config", path, "--dry-run", "--world-size", str(world)]) == 0, capsys.readouterr().err
    assert f"config OK for {world} rank(s)" in capsys.readouterr().out


def readme_dry_runs():
    """The ``launch/train.py ... --dry-run`` commands of README.md and configs/README.md."""
    commands = []
    for readme in ("README.md", os.path.join("configs", "README.md")):
        with open(os.path.join(REPO, readme), encoding="utf-8") as f:
            for line in f:
                if "launch/train.py" in line and "--dry-run" in line:
                    words = shlex.split(line.split("  #")[0])
                    commands.append(words[words.index("launch/train.py") + 1:])
    return commands


@pytest.mark.parametrize("args", readme_dry_runs(), ids=" ".join)
def test_readme_dry_run_commands_pass(args, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the commands run from the repository's root
    assert cli.main(args) == 0, capsys.readouterr().err


def test_readme_dry_runs_were_found():
    assert len(readme_dry_runs()) >= 2


def world_main(jobs):
    """Train each (name, raw config) of this world; a failure is kept per config, not raised, so
    that one config's error does not hide the others (every rank fails alike before a collective)."""
    import traceback

    from malora_dist.evaluation.run import evaluate_run

    out = {}
    for name, raw in jobs:
        hooks = Record()
        try:
            config = build_run_config(raw)
            run_training(config, hooks)
            out[name] = {"error": None, "mlp_runs": hooks.mlp_runs_in_training}
            if name in EVALUATED:
                adapter = os.path.join(config.train.output_dir, "adapter")
                out[name]["report"] = evaluate_run(config, None, adapter, limit=1)
        except Exception:  # noqa: BLE001 - reported by the config's own test
            out[name] = {"error": traceback.format_exc()}
    return out


@pytest.fixture(scope="module")
def miniatures(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("shipped"))
    by_world, configs = {}, {}
    for path in TRAINABLE:
        world, raw = miniature(path, root)
        configs[path] = (world, raw)
        by_world.setdefault(world, []).append((path, raw))
    results = {}
    for world, jobs in sorted(by_world.items()):
        per_rank = run_world(world, world_main, jobs)
        for path, _ in jobs:
            results[path] = [r[path] for r in per_rank]
    return configs, results


@pytest.mark.slow
@pytest.mark.parametrize("path", TRAINABLE, ids=_rel)
def test_trains_in_miniature(miniatures, path):
    configs, results = miniatures
    world, raw = configs[path]
    for rank, result in enumerate(results[path]):
        assert result["error"] is None, f"rank {rank} of {world}:\n{result['error']}"
    run_dir = raw["train"]["output_dir"]
    rows = [r for r in read_metrics(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert os.path.isfile(os.path.join(run_dir, "adapter", "adapter_model.safetensors"))
    train, config = raw["train"], build_run_config(copy.deepcopy(raw))
    if raw.get("checkpoint", {}).get("interval"):
        assert os.path.isdir(os.path.join(run_dir, "checkpoints", f"step_{STEPS}"))
    if train.get("tensorboard"):
        assert os.listdir(os.path.join(run_dir, "tensorboard"))
    if not train.get("eval_interval"):
        # Every decoder layer's MLP ran once per micro-batch, twice with activation checkpointing
        # (the recompute): the flag acted.
        dp = world // config.parallel.tp
        micro = config.train.global_batch_size // (dp * config.train.micro_batch_size)
        per_pass = STEPS * micro * TINY_MODEL["num_hidden_layers"]
        recompute = 2 if config.train.activation_checkpointing else 1
        assert results[path][0]["mlp_runs"] == recompute * per_pass


@pytest.mark.slow
@pytest.mark.parametrize("path", EVALUATED, ids=_rel)
def test_recipe_evaluates_in_miniature(miniatures, path):
    """Every task with a held-out set is scored by its metric."""
    configs, results = miniatures
    assert results[path][0]["error"] is None, results[path][0]["error"]
    report = results[path][0]["report"]
    config = build_run_config(copy.deepcopy(configs[path][1]))
    held_out = {t.name: t.metric for t in config.data.tasks if t.eval_split or t.eval_paths}
    assert {name: entry["metric"] for name, entry in report["tasks"].items()} == held_out
    assert len(held_out) == 5
    for name, entry in report["tasks"].items():
        assert entry["n"] == 1 and 0.0 <= entry["score"] <= 1.0, (name, entry)


def test_miniature_keeps_the_layout_kind(tmp_path):
    """tp, ep and dp above 1 stay above 1 (the shrink keeps the layout kind), and every config key
    outside the shrunk sizes is kept as shipped."""
    shrunk = {("train", "epochs"), ("train", "steps"), ("train", "output_dir"), ("train", "log_interval"),
              ("train", "eval_interval"), ("checkpoint", "interval"), ("data", "seq_len"), ("data", "tasks"),
              ("data", "local_dir"), ("parallel", "tp"), ("parallel", "ep")}
    for path in RUN_CONFIGS:
        shipped = _load(path)
        world, mini = miniature(path, str(tmp_path))
        par = shipped.get("parallel", {})
        tp, ep = par.get("tp", 1), par.get("ep", 1)
        dp = header_world_size(path) // tp
        mini_tp, mini_ep = mini["parallel"]["tp"], mini["parallel"]["ep"]
        assert (mini_tp > 1, mini_ep > 1, world // mini_tp > 1) == (tp > 1, ep > 1, dp > 1), path
        for section, values in shipped.items():
            if section == "model":
                continue
            for key, value in values.items():
                if (section, key) not in shrunk:
                    assert mini[section][key] == value, (path, section, key)
        for task, mini_task in zip(shipped["data"]["tasks"], mini["data"]["tasks"]):
            assert ({k: v for k, v in task.items() if k != "sample"}
                    == {k: v for k, v in mini_task.items() if k != "sample"})
            assert ("sample" in task) == ("sample" in mini_task)


# The benchmark configs README commands run read the full commonsense and GSM8K files from
# ../shared/data beside the directory they run from (the project's benchmark machines have it, a
# user points the paths elsewhere). A dry run checks that every file exists, so each runs here from
# an empty directory beside a ``shared/data`` made of the tests' real samples of the same files:
# the same relative paths, whatever lies beside this clone.
BENCHMARK_CONFIGS = sorted(glob.glob(os.path.join(REPO, "benchmarks", "configs", "*.yaml"))
                           + glob.glob(os.path.join(REPO, "benchmarks", "reproduction", "*.yaml")))
REPRODUCTION = os.path.join(REPO, "benchmarks", "reproduction", "commonsense5_smollm2.yaml")


@pytest.fixture
def beside_sample_data(tmp_path, monkeypatch):
    """Work from ``tmp/checkout`` with ``tmp/shared/data/{commonsense,math}`` holding the samples."""
    data = tmp_path / "shared" / "data"
    data.mkdir(parents=True)
    for name in ("commonsense", "math"):
        (data / name).symlink_to(os.path.join(REPO, "tests", "fixtures", name), target_is_directory=True)
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")


@pytest.mark.parametrize("path", BENCHMARK_CONFIGS, ids=_rel)
def test_benchmark_config_dry_runs(path, capsys, beside_sample_data):
    assert cli.main(["--config", path, "--dry-run", "--world-size", "1"]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("method,rank", [("lora", 32), ("molora", 8), ("malora", 8)])
def test_reproduction_sweep_points_dry_run(method, rank, capsys, beside_sample_data):
    """The README's reproduction grid: adapter.method/adapter.rank=lora/32,molora/8,malora/8."""
    args = ["--config", REPRODUCTION, "--dry-run", "--world-size", "1",
            "--set", f"adapter.method={method}", "--set", f"adapter.rank={rank}"]
    assert cli.main(args) == 0, capsys.readouterr().err


def test_benchmark_configs_were_found():
    assert REPRODUCTION in BENCHMARK_CONFIGS and len(BENCHMARK_CONFIGS) >= 3
