"""The parameter report of the paper's methods on LLaMA-2-7B: counts against closed forms written
here from the methods' definitions, percentages against the paper's "params" figures."""

import json
import subprocess
import sys

import pytest

from malora_dist.analysis.parameters import PAPER_ROWS, paper_table

LAYERS = 32
SIX_TARGETS = [(4096, 4096)] * 3 + [(4096, 11008)] * 2 + [(11008, 4096)]  # (n, m): q k v gate up down
BASE = 6_738_415_616
N = 8


def per_model(per_target):
    return LAYERS * sum(per_target(n, m) for n, m in SIX_TARGETS)


# (trainable, frozen) per shipped config, from each method's definition
CLOSED_FORM = {
    "paper_inter_lora.yaml": (per_model(lambda n, m: 64 * (n + m)), 0),
    "paper_inter_asylora.yaml": (per_model(lambda n, m: 128 * m), per_model(lambda n, m: 128 * n)),
    "paper_inter_dora.yaml": (per_model(lambda n, m: 64 * (n + m) + m), 0),
    "paper_inter_moasylora.yaml": (per_model(lambda n, m: N * 16 * m + N * n), per_model(lambda n, m: N * 16 * n)),
    "paper_inter_molora.yaml": (per_model(lambda n, m: N * 8 * (n + m) + N * n), 0),
    "paper_inter_malora_small.yaml": (per_model(lambda n, m: 22 * n + N * 8 * (22 + m) + N * n), 0),
    "paper_inter_malora.yaml": (per_model(lambda n, m: 32 * n + N * 12 * (32 + m) + N * n), 0),
    "ablations/molora_r12.yaml": (per_model(lambda n, m: N * 12 * (n + m) + N * n), 0),
    "ablations/molora_r12_identical_init.yaml": (per_model(lambda n, m: N * 12 * (n + m) + N * n), 0),
    "ablations/malora_fixed_shared_A.yaml": (per_model(lambda n, m: N * 16 * (32 + m) + N * n),
                                             per_model(lambda n, m: 32 * n)),
    "ablations/malora_frozen_P.yaml": (per_model(lambda n, m: 32 * n + N * 12 * m + N * n),
                                       per_model(lambda n, m: N * 12 * 32)),
    "ablations/malora_no_asymmetry.yaml": (per_model(lambda n, m: 64 * n + N * 8 * (64 + m) + N * n), 0),
    "ablations/malora_no_shared_S_A.yaml": (per_model(lambda n, m: N * 32 * n + N * 12 * (32 + m) + N * n), 0),
    # S_B (m×d), per expert P_t (d×r̄) and Ā_t (r̄×n), the router
    "ablations/malora_shared_B.yaml": (per_model(lambda n, m: 32 * m + N * 12 * (32 + n) + N * n), 0),
    "ablations/hydralora.yaml": (per_model(lambda n, m: 8 * n + N * 8 * m + N * n), per_model(lambda n, m: N * 8 * 8)),
}


@pytest.fixture(scope="module")
def table():
    return {row["config"]: row for row in paper_table()}


def test_every_paper_row_is_reported_from_its_config(table):
    assert set(table) == set(CLOSED_FORM) == {path for _, path, _, _ in PAPER_ROWS}
    for path, (trainable, frozen) in CLOSED_FORM.items():
        row = table[path]
        assert row["base_params"] == BASE
        assert (row["trainable_params"], row["frozen_adapter_params"]) == (trainable, frozen), path
        assert row["trainable_percent"] == pytest.approx(100 * trainable / BASE)
        assert row["trainable_percent_of_all"] == pytest.approx(100 * trainable / (BASE + trainable + frozen))


# Table 1's column rounds from PEFT's count (trainable over base plus every adapter parameter).
@pytest.mark.parametrize("path,paper", [("paper_inter_lora.yaml", 2.1), ("paper_inter_asylora.yaml", 2.2),
                                        ("paper_inter_dora.yaml", 2.1), ("paper_inter_molora.yaml", 2.2),
                                        ("paper_inter_malora_small.yaml", 1.6), ("paper_inter_malora.yaml", 2.3)])
def test_table1_params_column_is_reproduced(table, path, paper):
    assert round(table[path]["trainable_percent_of_all"], 1) == paper
    assert "trainable_percent_of_all" in table[path]["matches"]


def test_moasylora_is_just_past_the_rounding_of_the_papers_figure(table):
    """The paper does not give MoAsyLoRA's rank; at 2r = 16 its count is 2.351 %, which rounds to 2.4,
    not the paper's 2.3 (0.001 past the boundary): reported as it is, not tuned to match."""
    row = table["paper_inter_moasylora.yaml"]
    assert 2.35 < row["trainable_percent_of_all"] < 2.352
    assert row["matches"] == []


def test_no_moasylora_rank_reproduces_the_papers_figure_with_the_count_of_the_other_rows():
    """The paper's MoAsyLoRA row is inconsistent with its other rows: under the count that reproduces
    those six (trainable over base plus every adapter tensor, router counted, frozen A_t in the
    denominator), no rank gives a figure that rounds to 2.3 — rank 15 falls to 2.2, rank 16 rises
    to 2.4 — so the shipped config keeps rank 2r = 16 (AsyLoRA's doubling of LoRA's rank)."""
    def percent_of_all(rank):
        trainable = per_model(lambda n, m: N * rank * m + N * n)
        frozen = per_model(lambda n, m: N * rank * n)
        return 100 * trainable / (BASE + trainable + frozen)

    rounded = {rank: round(percent_of_all(rank), 1) for rank in range(1, 65)}
    assert 2.3 not in rounded.values()
    assert (rounded[15], rounded[16]) == (2.2, 2.4)


def test_table3_molora_r12_is_the_percent_of_the_base(table):
    assert round(table["ablations/molora_r12.yaml"]["trainable_percent"], 1) == 3.3


@pytest.mark.slow  # a second full table in a subprocess
def test_paper_cli_prints_the_table():
    out = subprocess.run([sys.executable, "-m", "malora_dist.commands.params", "--paper", "--json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    assert [r["row"] for r in rows] == [label for label, _, _, _ in PAPER_ROWS]


def test_params_cli_without_arguments_says_what_to_give():
    out = subprocess.run([sys.executable, "-m", "malora_dist.commands.params"], capture_output=True, text=True)
    assert out.returncode == 2 and "--paper" in out.stderr
