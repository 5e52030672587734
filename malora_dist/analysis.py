"""What a trained mixture of adapters learned (the paper's Figs. 2 and 3).

    python -m malora_dist.analysis RUN/adapter [OTHER ...] --out DIR [--labels a,b]
    python -m malora_dist.analysis RUN/checkpoints/step_N --out DIR      # a checkpoint of any layout
    python -m malora_dist.analysis RUN/adapter --out DIR --delta         # also what training changed

For every adapted linear (adapter files and checkpoints are layout-free, so any training layout
reads the same):

- **CCA similarity between its experts**, on the down side (MoLoRA's ``A_t``, MALoRA's
  ``P_t S_A``, mirrored MALoRA's ``Ā_t``: subspaces of the input space spanned by their rows) and on
  the up side (``B_t``, ``B̄_t``, mirrored MALoRA's ``S_B P_t``: subspaces of the output space
  spanned by their columns). The similarity of two experts
  is the mean of the canonical correlations of their subspaces (the cosines of the principal
  angles); a layer's is the mean over its pairs of experts. The paper's Fig. 2 finds MoLoRA's A
  side similar across experts and its B side not (below 0.05): the redundancy MALoRA's shared
  ``S_A`` removes. Beside each figure stands the similarity independent random subspaces of the
  same shapes have (printed in brackets): what a pair of experts shows with nothing shared learned.
- **Routing by task** (``--routing-examples N``, for ``RUN/adapter`` of a training run): the
  first N held-out examples of each of the run's tasks pass through the model, and each task's
  expert load per layer, its entropy and the distance between the tasks' loads are reported
  (``malora_dist.routing_analysis``).
- **Singular values** of the concatenated down matrices (rows of all experts stacked) and of the
  concatenated up matrices (columns side by side), as in Fig. 3, with their effective rank
  (exp of the entropy of the normalised spectrum).

- **What training changed** (``--delta``): the same CCA and spectra of trained − step-0 values,
  per expert (MALoRA's effective P_t S_A included), the step-0 values recomputed from the run's
  seed (``RUN/config.yaml``, or ``--seed``), beside the present view (``delta_analysis.py``). A
  relative change near √2 on every layer means the start is not the one that trained the adapter
  (another seed, or a file from before the initial values were a function of (seed, layer, expert)).

Summaries per projection type (q_proj, …) average over layers. Several inputs are put side by side
(the paper's ST(S), ST(D) and MT settings are three runs). Writes ``analysis.json``, its summary
without per-layer detail (``summary.json``), the tables (``tables.md``, also printed) and, with
matplotlib installed (``pip install 'malora_dist[plots]'``), ``cca.png``, ``spectra.png``,
``cca_summary.png``, with routing ``routing.png``, with ``--delta`` ``cca_delta.png``,
``spectra_delta.png`` and ``cca_summary_delta.png`` (present and change side by side).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from itertools import combinations
from typing import Optional

import torch

from .adapters.io import WEIGHTS_NAME, read_adapter_state
from .export import export_checkpoint
from .routing_analysis import routing_by_task
from .train.config import load_run_config

# Singular values below this fraction of the largest span no direction (B̄ = 0 at init spans none).
RANK_TOLERANCE = 1e-6


def subspace_basis(matrix: torch.Tensor) -> Optional[torch.Tensor]:
    """An orthonormal basis (columns) of the column space of ``matrix``, or None if it is zero."""
    u, s, _ = torch.linalg.svd(matrix.double(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return None
    return u[:, s > RANK_TOLERANCE * s[0]]


def canonical_correlations(a: torch.Tensor, b: torch.Tensor) -> Optional[torch.Tensor]:
    """Canonical correlations between the column spaces of ``a`` and ``b`` (descending)."""
    qa, qb = subspace_basis(a), subspace_basis(b)
    if qa is None or qb is None:
        return None
    return torch.linalg.svdvals(qa.t() @ qb).clamp(max=1.0)


def cca_similarity(a: torch.Tensor, b: torch.Tensor) -> Optional[float]:
    """Mean canonical correlation of two column spaces; None where either matrix is zero."""
    correlations = canonical_correlations(a, b)
    return None if correlations is None else float(correlations.mean())


def effective_rank(singular_values: torch.Tensor) -> float:
    p = singular_values / singular_values.sum().clamp(min=1e-30)
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


def layer_experts(state: dict, prefix: str, method: str, num_experts: int) -> tuple[list, list]:
    """(down, up) per expert of one layer, in float64: down (r × n) rows in the input space, up (m × r)."""
    state = {k: v.double() for k, v in state.items() if k.startswith((prefix, f"base_model.model.{prefix}"))}
    if method == "lora":
        return ([state[f"base_model.model.{prefix}.lora_A.weight"]], [state[f"base_model.model.{prefix}.lora_B.weight"]])
    down = [state[f"{prefix}.experts.{t}.down"] for t in range(num_experts)]
    if f"{prefix}.experts.0.subspace" in state:  # adapter.subspace: per_expert
        down = [p @ state[f"{prefix}.experts.{t}.subspace"] for t, p in enumerate(down)]
    elif f"{prefix}.shared_A" in state:  # an expert's down-projection is P_t S_A (HydraLoRA: P_t = I)
        down = [p @ state[f"{prefix}.shared_A"] for p in down]
    up = [state[f"{prefix}.experts.{t}.up"] for t in range(num_experts)]
    if f"{prefix}.shared_B" in state:  # adapter.shared_side: up: an expert's up-projection is S_B P_t
        up = [state[f"{prefix}.shared_B"] @ p for p in up]
    return down, up


def layer_prefixes(state: dict, method: str) -> list[str]:
    if method == "lora":
        return sorted(k[len("base_model.model."):-len(".lora_A.weight")] for k in state if k.endswith(".lora_A.weight"))
    return sorted({k.rsplit(".experts.", 1)[0] for k in state if ".experts." in k})


def mean_pairwise(matrices: list, transpose: bool) -> dict:
    """Mean CCA similarity over pairs of experts, and the full matrix (None where undefined)."""
    n = len(matrices)
    table = [[1.0 if i == j else None for j in range(n)] for i in range(n)]
    values = []
    for i, j in combinations(range(n), 2):
        a, b = (matrices[i].t(), matrices[j].t()) if transpose else (matrices[i], matrices[j])
        value = cca_similarity(a, b)
        table[i][j] = table[j][i] = value
        if value is not None:
            values.append(value)
    return {"mean": sum(values) / len(values) if values else None, "pairs": table}


# Draws per shape for the random-subspace baseline: its mean is steady to about ±0.005 at 32.
RANDOM_BASELINE_DRAWS = 32


@functools.lru_cache(maxsize=None)
def random_subspace_similarity(ambient: int, dim: int) -> float:
    """The CCA similarity two independent random ``dim``-dimensional subspaces of an
    ``ambient``-dimensional space have on average (seeded Monte Carlo): the level a pair of experts
    shows with no shared direction learned (MoLoRA's A_t at their random initialisation sit near it)."""
    generator = torch.Generator().manual_seed(ambient * 100_003 + dim)
    draws = [cca_similarity(torch.randn(ambient, dim, generator=generator, dtype=torch.float64),
                            torch.randn(ambient, dim, generator=generator, dtype=torch.float64))
             for _ in range(RANDOM_BASELINE_DRAWS)]
    return sum(draws) / len(draws)


def spectrum(matrix: torch.Tensor) -> dict:
    values = torch.linalg.svdvals(matrix.double())
    return {"singular_values": values.tolist(), "effective_rank": effective_rank(values)}


def analyse_layer(down: list, up: list) -> dict:
    """CCA between the experts of one layer (down_t: r × n, up_t: m × r), its random level, spectra."""
    return {
        # rows of down_t span a subspace of the input space: compare the columns of down_tᵀ
        "cca_down": mean_pairwise(down, transpose=True) if len(down) > 1 else None,
        "cca_up": mean_pairwise(up, transpose=False) if len(up) > 1 else None,
        # what independent random subspaces of the experts' shapes would give
        "cca_down_random": random_subspace_similarity(down[0].shape[1], min(down[0].shape)) if len(down) > 1 else None,
        "cca_up_random": random_subspace_similarity(up[0].shape[0], min(up[0].shape)) if len(up) > 1 else None,
        "spectrum_down": spectrum(torch.cat(down, dim=0)),
        "spectrum_up": spectrum(torch.cat(up, dim=1)),
    }


def analyse_state(state: dict, method: str, num_experts: int) -> dict:
    layers = {prefix: analyse_layer(*layer_experts(state, prefix, method, num_experts))
              for prefix in layer_prefixes(state, method)}
    return {"method": method, "num_experts": num_experts, "layers": layers, "by_projection": by_projection(layers)}


def mean_present(values) -> Optional[float]:
    """The mean of the values that are not None; None if there are none."""
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def by_projection(layers: dict) -> dict:
    """Per projection type (the name's last part), the mean over layers of each summary."""
    groups: dict = {}
    for prefix, layer in layers.items():
        groups.setdefault(prefix.rsplit(".", 1)[-1], []).append(layer)
    out = {}
    for name, members in sorted(groups.items()):
        out[name] = {
            "cca_down": mean_present([m["cca_down"]["mean"] if m["cca_down"] else None for m in members]),
            "cca_up": mean_present([m["cca_up"]["mean"] if m["cca_up"] else None for m in members]),
            "cca_down_random": mean_present([m["cca_down_random"] for m in members]),
            "cca_up_random": mean_present([m["cca_up_random"] for m in members]),
            "effective_rank_down": mean_present([m["spectrum_down"]["effective_rank"] for m in members]),
            "effective_rank_up": mean_present([m["spectrum_up"]["effective_rank"] for m in members]),
            "layers": len(members),
        }
    return out


def read_adapter(path: str) -> tuple[dict, object]:
    """(state, adapter config) of an adapter directory or of a checkpoint ``RUN/checkpoints/step_N``
    (exported through the run's own ``RUN/config.yaml``)."""
    if os.path.exists(os.path.join(path, WEIGHTS_NAME)):
        return read_adapter_state(path)
    run_config = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "config.yaml")
    if not os.path.exists(run_config):
        raise ValueError(f"{path!r} is neither an adapter directory (no {WEIGHTS_NAME}) nor a checkpoint "
                         f"RUN/checkpoints/step_N with the run's RUN/config.yaml")
    with tempfile.TemporaryDirectory() as out:
        export_checkpoint(load_run_config(run_config), path, out)
        return read_adapter_state(out)


def analyse(path: str, routing_examples: int = 0, delta: bool = False, seed: Optional[int] = None) -> dict:
    """The analysis of one adapter; with ``delta`` also that of what training changed, from the
    step-0 values of ``seed`` (default: the seed of the adapter's run, ``RUN/config.yaml``)."""
    state, config = read_adapter(path)
    num_experts = config.num_experts if config.is_moe else 1
    result = {"source": path, **analyse_state(state, config.method, num_experts)}
    if delta:
        # delta_analysis builds on this module's functions, so it is imported where it is used
        from .delta_analysis import analyse_change, max_abs_change
        from .initial_state import initial_adapter_state, seed_for

        run_seed = seed_for(path, seed)
        initial = initial_adapter_state(state, config, run_seed)
        result["delta"] = {"seed": run_seed, "max_abs_change": max_abs_change(state, initial),
                           **analyse_change(state, initial, config.method, num_experts)}
    if routing_examples:
        result["routing"] = routing_by_task(path, routing_examples)
    return result


def analyse_all(paths: list, routing_examples: int, delta: bool, seed: Optional[int], jobs: int) -> list:
    """``analyse`` of every path, in order; ``jobs`` > 1: that many at once, each in a spawned process
    (a fresh one, so a CUDA device or a process group of the parent is never inherited)."""
    arguments = [(path, routing_examples, delta, seed) for path in paths]
    if jobs == 1 or len(paths) == 1:
        return [analyse(*a) for a in arguments]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(min(jobs, len(paths)), mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(analyse, *zip(*arguments)))


def summary(results: dict) -> dict:
    """The results without their per-layer detail (per projection type, routing means)."""
    def brief(result: dict) -> dict:
        out = {k: v for k, v in result.items() if k not in ("layers", "delta", "routing")}
        if result.get("delta"):
            out["delta"] = {k: v for k, v in result["delta"].items() if k != "layers"}
        if result.get("routing"):
            out["routing"] = {k: result["routing"][k] for k in ("examples_per_task", "mean_load", "mean_entropy",
                                                                 "mean_task_distance") if k in result["routing"]}
        return out
    return {"runs": {label: brief(r) for label, r in results.items()}}


def plot_routing(results: dict, out_dir: str, plt) -> list[str]:
    """routing.png: per run, the mean expert load (over layers) of each task, as a task × expert map."""
    routed = {label: r["routing"] for label, r in results.items() if r.get("routing")}
    if not routed:
        return []
    fig, axes = plt.subplots(1, len(routed), figsize=(4.5 * len(routed), 3.5), squeeze=False)
    for ax, (label, routing) in zip(axes[0], routed.items()):
        tasks = list(routing["mean_load"])
        image = ax.imshow([routing["mean_load"][t] for t in tasks], aspect="auto", cmap="viridis")
        ax.set_yticks(range(len(tasks)), tasks)
        ax.set_xlabel("expert")
        ax.set_title(f"{label}: load (mean over layers)\ntask distance {routing['mean_task_distance']:.3f}",
                     fontsize="small")
        fig.colorbar(image, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "routing.png"), dpi=110)
    plt.close(fig)
    return ["routing.png"]


def _pyplot():
    """matplotlib's pyplot without a display, or None where matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(results: dict, out_dir: str) -> list[str]:
    """cca.png (per layer, down and up side, one line per run), spectra.png (normalised mean
    spectra per run), cca_summary.png and routing.png; with the learned changes (``--delta``) their
    counterparts cca_delta.png, spectra_delta.png and cca_summary_delta.png; nothing without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return []
    written = (plot_cca(results, os.path.join(out_dir, "cca.png"), "", plt)
               + plot_spectra(results, os.path.join(out_dir, "spectra.png"), "", plt)
               + plot_cca_summary(results, os.path.join(out_dir, "cca_summary.png"), plt)
               + plot_routing(results, out_dir, plt))
    changes = {label: r["delta"] for label, r in results.items() if r.get("delta")}
    if changes:
        # the present and the change of each run side by side: what training added to the start
        beside = {}
        for label, result in results.items():
            beside[label] = result
            if label in changes:
                beside[f"{label} Δ"] = changes[label]
        written += (plot_cca(changes, os.path.join(out_dir, "cca_delta.png"), "learned change, ", plt)
                    + plot_spectra(changes, os.path.join(out_dir, "spectra_delta.png"), "learned change, ", plt)
                    + plot_cca_summary(beside, os.path.join(out_dir, "cca_summary_delta.png"), plt,
                                       "CCA between experts: present and learned change (Δ)"))
    return written


def plot_cca(results: dict, path: str, what: str, plt) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, result in results.items():
        names = list(result["layers"])
        for ax, side in zip(axes, ("cca_down", "cca_up")):
            values = [(result["layers"][n][side] or {}).get("mean") for n in names]
            ax.plot([v if v is not None else float("nan") for v in values], marker=".", label=label)
    first = next(iter(results.values()))
    for ax, side in zip(axes, ("cca_down_random", "cca_up_random")):
        baseline = [first["layers"][n][side] for n in first["layers"]]
        if any(v is not None for v in baseline):
            ax.plot([v if v is not None else float("nan") for v in baseline], color="grey", linestyle=":",
                    label="random subspaces")
    for ax, title in zip(axes, ("down side (A_t / P_t S_A)", "up side (B_t / B̄_t)")):
        ax.set_title(f"CCA similarity between experts, {what}{title}", fontsize="medium")
        ax.set_xlabel("adapted layer")
        ax.legend(fontsize="small")
    axes[0].set_ylabel("mean canonical correlation")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def plot_spectra(results: dict, path: str, what: str, plt) -> list[str]:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, result in results.items():
        for ax, side in zip(axes, ("spectrum_down", "spectrum_up")):
            spectra = [torch.tensor(layer[side]["singular_values"]) for layer in result["layers"].values()]
            length = min(len(s) for s in spectra)
            mean = torch.stack([s[:length] / s[:length].mean().clamp(min=1e-30) for s in spectra]).mean(0)
            ax.plot(mean.tolist(), label=label)
    for ax, title in zip(axes, ("concatenated down matrices", "concatenated up matrices")):
        ax.set_title(f"singular values / their mean, {what}{title}", fontsize="medium")
        ax.set_xlabel("index")
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def plot_cca_summary(results: dict, path: str, plt,
                     title: str = "CCA similarity between experts (mean over layers)") -> list[str]:
    """The view of the paper's Fig. 2: per run, the mean over layers of the down-side and up-side
    similarity, with the random-subspace level of each drawn as a short black line."""
    rows = {label: [r["by_projection"][p] for p in r["by_projection"]] for label, r in results.items()}
    rows = {label: members for label, members in rows.items() if any(m["cca_down"] is not None for m in members)}
    if not rows:
        return []

    def mean(members, key):
        value = mean_present(m[key] for m in members)
        return float("nan") if value is None else value

    fig, ax = plt.subplots(figsize=(max(4.0, 1.3 * len(rows) + 1), 3.6))
    width = 0.38
    for i, (label, members) in enumerate(rows.items()):
        for offset, side, colour in ((-width / 2, "down", "tab:blue"), (width / 2, "up", "tab:orange")):
            ax.bar(i + offset, mean(members, f"cca_{side}"), width, color=colour, label=side if i == 0 else None)
            level = mean(members, f"cca_{side}_random")
            ax.hlines(level, i + offset - width / 2, i + offset + width / 2, colors="black",
                      label="random subspaces" if i == 0 and side == "down" else None)
    ax.set_xticks(range(len(rows)), list(rows), rotation=20)
    ax.set_ylabel("mean canonical correlation")
    ax.set_title(title, fontsize="medium")
    ax.set_ylim(0, 1)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [os.path.basename(path)]


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.3f}"


def tables(results: dict) -> str:
    """The per-projection tables in Markdown: the present values, the learned changes where
    analysed, routing where measured."""
    lines = ["| run | projection | CCA down (random) | CCA up (random) | eff. rank down | eff. rank up |",
             "|---|---|---|---|---|---|"]
    for label, result in results.items():
        for name, row in result["by_projection"].items():
            lines.append(f"| {label} | {name} | {_fmt(row['cca_down'])} ({_fmt(row['cca_down_random'])}) | "
                         f"{_fmt(row['cca_up'])} ({_fmt(row['cca_up_random'])}) | "
                         f"{row['effective_rank_down']:.1f} | {row['effective_rank_up']:.1f} |")
    changes = {label: r["delta"] for label, r in results.items() if r.get("delta")}
    if changes:
        lines += ["", "Learned change (trained − step 0, from the run's seed); ‖Δ‖/‖X⁰‖: the down side's change "
                  "relative to its start (the up side starts at zero); P_t: MALoRA's coefficients.", "",
                  "| run | projection | ΔCCA down (random) | ΔCCA up (random) | eff. rank Δdown | eff. rank Δup | "
                  "‖Δdown‖/‖down⁰‖ | ΔP_t CCA (random) | ‖ΔS_A‖/‖S_A⁰‖ |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for label, change in changes.items():
            for name, row in change["by_projection"].items():
                lines.append(f"| {label} | {name} | {_fmt(row['cca_down'])} ({_fmt(row['cca_down_random'])}) | "
                             f"{_fmt(row['cca_up'])} ({_fmt(row['cca_up_random'])}) | "
                             f"{row['effective_rank_down']:.1f} | {row['effective_rank_up']:.1f} | "
                             f"{_fmt(row.get('change_down'))} | {_fmt(row.get('cca_coefficients'))} "
                             f"({_fmt(row.get('cca_coefficients_random'))}) | {_fmt(row.get('change_shared'))} |")
    routed = {label: r["routing"] for label, r in results.items() if r.get("routing")}
    if routed:
        lines += ["", "| run | task | load entropy (mean over layers) | mean load per expert |", "|---|---|---|---|"]
        for label, routing in routed.items():
            for task, entropy in routing["mean_entropy"].items():
                load = " ".join(f"{v:.2f}" for v in routing["mean_load"][task])
                lines.append(f"| {label} | {task} | {entropy:.3f} | {load} |")
            lines.append(f"| {label} | (between tasks) | mean total-variation distance "
                         f"{routing['mean_task_distance']:.3f} | |")
    return "\n".join(lines)


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m malora_dist.analysis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", help="adapter directories or checkpoint directories RUN/checkpoints/step_N")
    parser.add_argument("--out", required=True, help="directory for analysis.json, summary.json, tables.md and the plots")
    parser.add_argument("--labels", help="comma-separated names of the inputs (default: their paths)")
    parser.add_argument("--routing-examples", type=int, default=0, metavar="N",
                        help="routing by task from the first N held-out examples of each task of the "
                             "adapter's run (RUN/adapter with RUN/config.yaml); 0: off")
    parser.add_argument("--delta", action="store_true",
                        help="also analyse what training changed: trained minus the step-0 values, recomputed "
                             "from the run's seed (RUN/config.yaml beside RUN/adapter or RUN/checkpoints)")
    parser.add_argument("--seed", type=int, help="with --delta: the train.seed of every input, for adapters "
                                                 "without their run's config")
    parser.add_argument("--jobs", type=int, default=1,
                        help="inputs analysed at once, each in a process of its own (routing runs the model)")
    args = parser.parse_args(argv)
    labels = args.labels.split(",") if args.labels else args.inputs
    if len(labels) != len(args.inputs):
        print(f"error: --labels names {len(labels)} inputs, but {len(args.inputs)} are given", file=sys.stderr)
        return 2
    try:
        if args.routing_examples < 0:
            raise ValueError(f"--routing-examples must be 0 (off) or positive, got {args.routing_examples}")
        if args.seed is not None and not args.delta:
            raise ValueError("--seed gives the step-0 values of --delta: pass --delta with it")
        if args.jobs < 1:
            raise ValueError(f"--jobs must be positive, got {args.jobs}")
        results = dict(zip(labels, analyse_all(args.inputs, args.routing_examples, args.delta, args.seed, args.jobs)))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    plots = plot(results, args.out)
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump({"runs": results, "plots": plots}, f, indent=1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary(results), f, indent=1)
    text = tables(results)
    with open(os.path.join(args.out, "tables.md"), "w") as f:
        f.write(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
