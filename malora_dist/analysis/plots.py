"""The analysis's figures (matplotlib, an optional dependency: ``pip install 'malora_dist[plots]'``)."""

from __future__ import annotations

import os

import torch

from malora_dist.analysis.subspaces import mean_present


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
