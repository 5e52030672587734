"""The benchmark scripts on tiny sizes: they run end to end (real gloo worlds, the library's trainer)
and write JSON with the fields that benchmarks/README.md reads.

Both scripts run at once as subprocesses (``--quick``: a tiny random LLaMA instead of SmolLM2, tiny
layer shapes, one or two timed rounds). Timings are not judged; the accounting is, against closed
forms computed here from the model shapes (docs/ARCHITECTURE.md §1.7 (parameter counts), §3.5 (what
travels)): trainable parameters, all-to-all bytes per step, and the cost model's predicted exchange
time from the measured link.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # benchmark subprocesses (the fast tier: pytest -m "not slow")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The tiny model of ``throughput.py --quick``: hidden 64, MLP 128, 4 heads and 4 KV heads (q/k/v/o
# 64 wide), 2 layers; six adapted linears per layer as (n, m).
TINY_LINEARS = [(64, 64), (64, 64), (64, 64), (64, 128), (64, 128), (128, 64)]
TINY_LAYERS = 2
QUICK = dict(seq_len=32, global_batch=4, dp=2, micro_batch=2)
EXTRA = "lora8:method=lora,rank=8"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("bench"))
    commands = {
        "throughput": [sys.executable, "benchmarks/throughput.py", "--quick", "--output-dir", out,
                       "--memory-variants", "malora-d32-r12", "--method", EXTRA],
        "crossover": [sys.executable, "benchmarks/crossover.py", "--quick", "--output-dir", out],
        "ep_step": [sys.executable, "benchmarks/ep_step.py", "--quick",
                    "--output", os.path.join(out, "ep_step_quick.json")],
    }
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = {name: subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, cmd in commands.items()}
    loaded = {"dir": out}
    for name, proc in procs.items():
        output, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, f"{name} failed:\n{output[-4000:]}"
        with open(os.path.join(out, f"{name}_quick.json")) as f:
            loaded[name] = json.load(f)
    return loaded


def test_throughput_layer_rows(results):
    layer = results["throughput"]["layer"]
    rows = layer["results"]
    assert {"base", "lora-r64", "molora-r8-dense", "malora-d32-r12-sparse", "lora8"} <= set(rows)
    n, m = layer["shape"]["n"], layer["shape"]["m"]
    assert rows["lora8"]["trainable_params"] == 8 * (n + m)
    assert rows["molora-r8-dense"]["trainable_params"] == 8 * 8 * (n + m) + 8 * n
    assert rows["malora-d32-r12-dense"]["trainable_params"] == 32 * n + 8 * 12 * (32 + m) + 8 * n
    assert rows["base"]["ratio_to_base"] == 1.0 and rows["base"]["trainable_params"] == 0
    for row in rows.values():
        for key in ("forward_ms", "backward_ms", "fwd_bwd_ms", "fwd_bwd_cpu_ms"):
            assert row[key]["median"] > 0 and row[key]["min"] <= row[key]["median"] <= row[key]["max"]
        assert row["optimizer_ms"]["median"] >= 0 and row["tokens_per_s"] > 0
    assert layer["threads"] == 1


def _tiny_params(method):
    """docs/ARCHITECTURE.md §1.7 (parameter counts) per adapted linear, summed over the tiny model."""
    per = {"lora-r64": lambda n, m: 64 * (n + m), "lora8": lambda n, m: 8 * (n + m),
           "molora-r8": lambda n, m: 8 * 8 * (n + m) + 8 * n,
           "malora-d32-r12": lambda n, m: 32 * n + 8 * 12 * (32 + m) + 8 * n}[method]
    return TINY_LAYERS * sum(per(n, m) for n, m in TINY_LINEARS)


def _tiny_a2a_bytes(width):
    """Per rank and step: dispatch (width) and combine (m) of every slot, forward and backward, plus
    the int64 count exchange (N = 8 experts, forward only), over ``dp`` ranks of one micro-batch each."""
    slots = QUICK["global_batch"] // QUICK["dp"] * QUICK["seq_len"] * 2  # top-2
    per_layer = [2 * slots * 4 * (width(n) + m) + 8 * 8 for n, m in TINY_LINEARS]
    return TINY_LAYERS * sum(per_layer)


def test_throughput_training_rows(results):
    training = results["throughput"]["training"]
    single, pair = training["layouts"]["single"], training["layouts"]["2proc"]
    assert single["processes"] == 1 and pair["processes"] == 2 and pair["threads_per_process"] == 1
    assert set(single["variants"]) == {"base", "lora-r64", "molora-r8", "malora-d32-r12", "lora8"}
    assert set(pair["variants"]) == {"base", "lora-r64", "lora8"} | {
        f"{m}@{p}" for m in ("molora-r8", "malora-d32-r12") for p in ("ep", "auto", "replicate")}
    for layout in (single, pair):
        for name, row in layout["variants"].items():
            for key in ("forward_s", "backward_s", "step_s", "tokens_per_s", "cpu_s"):
                assert row[key]["median"] > 0, (name, key)
            assert row["optimizer_s"]["median"] >= 0
            if name != "base":
                assert row["trainable_params"] == _tiny_params(name.split("@")[0]), name
                assert "overhead_s" in row and "step_over_base" in row
    assert single["variants"]["malora-d32-r12"]["peak_rss_mb_own_process"]["max_rank_mb"] > 100

    variants = pair["variants"]
    # Exact closed forms: the benchmark's bytes are the mean over ranks, independent of routing.
    for name, width in (("molora-r8@ep", lambda n: n), ("malora-d32-r12@ep", lambda n: 32)):
        a2a = variants[name]["a2a_bytes"]
        assert a2a["min"] == a2a["max"] == _tiny_a2a_bytes(width), name
        assert variants[name]["layers_ep"] == TINY_LAYERS * len(TINY_LINEARS)
        assert 0 < variants[name]["a2a_remote_bytes"]["median"] < a2a["median"]
    for name in ("molora-r8@replicate", "malora-d32-r12@replicate", "lora-r64", "base"):
        assert variants[name]["a2a_bytes"]["max"] == 0, name
    assert variants["malora-d32-r12@replicate"]["layers_replicated"] == TINY_LAYERS * len(TINY_LINEARS)
    assert variants["malora-d32-r12@auto"]["link"]["latency_s"] > 0
    # Replicated experts all-reduce all N experts' gradients; under ep=2 (edp=1) experts are not reduced.
    assert variants["malora-d32-r12@replicate"]["grad_allreduce_payload_bytes"] == 4 * _tiny_params("malora-d32-r12")
    assert variants["malora-d32-r12@ep"]["grad_allreduce_payload_bytes"] < 4 * _tiny_params("malora-d32-r12")


def test_throughput_targets_and_plots(results):
    result = results["throughput"]
    meta = result["meta"]
    for key in ("date", "cpu_model", "cpu_count", "load_average_start", "load_average_end", "shared_machine",
                "command"):
        assert key in meta
    targets = result["targets"]
    assert len(targets) == 5
    for t in targets:
        assert {"target", "measured", "limit", "met"} <= set(t) and isinstance(t["met"], bool) and t["measured"] > 0
    bytes_target = next(t for t in targets if "bytes" in t["target"])
    assert bytes_target["measured"] == pytest.approx(_tiny_a2a_bytes(lambda n: 32) / _tiny_a2a_bytes(lambda n: n))
    if importlib.util.find_spec("matplotlib") is not None:
        for plot in ("throughput_quick_layer.png", "throughput_quick_steps.png", "throughput_quick_bytes.png"):
            assert plot in result["plots"] and os.path.getsize(os.path.join(results["dir"], plot)) > 1000


def test_markdown_tables(results):
    """``--markdown-from`` renders every variant and cell of the result files (the README's tables)."""
    for script, stem in (("throughput", "throughput_quick"), ("crossover", "crossover_quick")):
        out = subprocess.run([sys.executable, f"benchmarks/{script}.py", "--markdown-from",
                              os.path.join(results["dir"], f"{stem}.json")], cwd=REPO, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr
        if script == "throughput":
            for layout in results["throughput"]["training"]["layouts"].values():
                for name in layout["variants"]:
                    assert f"| {name} |" in out.stdout
            assert out.stdout.count("**not met**") + out.stdout.count("| met |") == 5
        else:
            assert out.stdout.count("| malora |") == len(results["crossover"]["cells"])


def test_crossover_cells(results):
    result = results["crossover"]
    cells = result["cells"]
    assert {(c["num_experts"], c["tokens_per_rank"]) for c in cells} == {(4, 16), (4, 64), (8, 16), (8, 64)}
    link = result["link_start"]
    assert link["latency_s"] > 0 and link["bytes_per_s"] > 0
    m = result["shape"]["m"]
    for cell in cells:
        for placement in ("ep", "replicate"):
            assert cell["measured"][placement]["step_s"]["median"] > 0
        # placement_costs from the parts' own cost terms (MALoRA d=32, r̄=12, top-2, ep=2, one
        # micro-batch): the exchange's 5 collectives and 2·T·k·(d+m)·4·(ep−1)/ep bytes; replicate's
        # extra expert all-reduce; and the work counted from the kernels' ops, whose FLOPs must
        # differ by what the dense kernel computes beyond routing, 6·T·(N−k)·r̄·(d+m), plus the
        # fused dense kernel's gate gradients as one batched product, 2·T·N·r̄ (the grouped
        # kernels form them in the combine's elementwise ops, which count no FLOPs).
        num, tokens = cell["num_experts"], cell["tokens_per_rank"]
        exchange, replicate = cell["predicted"]["exchange_terms"], cell["predicted"]["replicate_terms"]
        assert exchange["collectives"] == 5 and replicate["collectives"] == 0
        assert exchange["link_bytes"] == pytest.approx(2 * tokens * 2 * (32 + m) * 4 * 0.5, rel=1e-9)
        assert replicate["reduce_bytes"] == pytest.approx(2 * 0.5 * num * 12 * (32 + m) * 4, rel=1e-9)
        assert replicate["flops"] - exchange["flops"] == pytest.approx(
            6 * tokens * (num - 2) * 12 * (32 + m) + 2 * tokens * num * 12, rel=1e-9)
        assert exchange["ops"] > replicate["ops"] > 0 and exchange["copy_bytes"] > 0
        for side in ("exchange", "replicate"):
            terms = cell["predicted"][f"{side}_terms"]
            seconds = (terms["collectives"] * link["latency_s"] + terms["link_bytes"] / link["bytes_per_s"]
                       + terms["reduce_bytes"] / link["reduce_bytes_per_s"] + terms["ops"] * link["op_s"]
                       + terms["copy_bytes"] / link["copy_bytes_per_s"] + terms["flops"] / link["flops_per_s"])
            assert cell["predicted"][f"{side}_s"] == pytest.approx(seconds, rel=1e-9)
        predicted = "replicate" if cell["predicted"]["replicate_s"] <= cell["predicted"]["exchange_s"] else "ep"
        assert cell["predicted"]["choice"] == predicted
        assert cell["agree"] == (cell["measured_choice"] == predicted)
    assert 0 <= result["agreement"] <= 1
    if importlib.util.find_spec("matplotlib") is not None:
        assert result["plots"] == ["crossover_quick.png"]


def test_ep_step_counts_the_exchanges(results):
    """benchmarks/ep_step.py --quick: six targets on 2 layers, one micro-batch per rank, ep=2 — one
    exchange per layer is 6 × 2 exchanges (5 collectives, 1 host read each) per step, siblings share
    3 × 2; the bytes do not depend on kernel or sharing; replicate exchanges nothing."""
    rows = results["ep_step"]["variants"]
    assert set(rows) == {"base", "malora before", "malora siblings", "malora fused", "malora fused+siblings",
                         "malora replicate", "malora auto", "molora before", "molora fused+siblings"}
    for method in ("malora", "molora"):
        before, after = rows[f"{method} before"], rows[f"{method} fused+siblings"]
        assert (before["a2a_collectives"], before["a2a_host_reads"]) == (6 * 2 * 5, 6 * 2)
        assert (after["a2a_collectives"], after["a2a_host_reads"]) == (3 * 2 * 5, 3 * 2)
        assert after["a2a_bytes"] == before["a2a_bytes"] > 0 and after["layers_ep"] == 2 * 6
        assert before["speedup_wall"] == 1.0 and after["step_s"] > 0 and after["speedup_cpu"] > 0
    assert rows["malora fused"]["a2a_collectives"] == 60 and rows["malora siblings"]["a2a_collectives"] == 30
    assert rows["malora replicate"]["a2a_collectives"] == 0 and rows["malora replicate"]["layers_replicated"] == 12
