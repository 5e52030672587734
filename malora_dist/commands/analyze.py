"""``malora-analyze``: what a trained mixture of adapters learned (the paper's Figs. 2 and 3).

    python -m malora_dist.commands.analyze RUN/adapter [OTHER ...] --out DIR [--labels a,b]
    python -m malora_dist.commands.analyze RUN/checkpoints/step_N --out DIR      # a checkpoint of any layout
    python -m malora_dist.commands.analyze RUN/adapter --out DIR --delta         # also what training changed

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
  (``malora_dist.analysis.routing``).
- **Singular values** of the concatenated down matrices (rows of all experts stacked) and of the
  concatenated up matrices (columns side by side), as in Fig. 3, with their effective rank
  (exp of the entropy of the normalised spectrum).

- **What training changed** (``--delta``): the same CCA and spectra of trained − step-0 values,
  per expert (MALoRA's effective P_t S_A included), the step-0 values recomputed from the run's
  seed (``RUN/config.yaml``, or ``--seed``), beside the present view (``malora_dist.analysis.delta``). A
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
import json
import os
import sys
from typing import Optional

from malora_dist.analysis.experts import analyse_all, summary, tables
from malora_dist.analysis.plots import plot


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(prog="malora-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+",
                        help="adapter directories or checkpoint directories RUN/checkpoints/step_N")
    parser.add_argument("--out", required=True,
                        help="directory for analysis.json, summary.json, tables.md and the plots")
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
