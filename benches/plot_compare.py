"""Training-loss curves of several ``qalora compare`` runs side by side: one panel per
``compare.json``, each method's 10-step moving average, and the mean loss of its last 20
steps printed (what benches/RESULTS.md quotes).

    python benches/plot_compare.py RUN1/compare.json RUN2/compare.json --out plots/NAME.png
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np


def moving_average(values: list[float], window: int = 10) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if len(v) < window:
        return v
    return np.convolve(v, np.ones(window) / window, mode="valid")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="compare.json files")
    ap.add_argument("--out", required=True, help="the PNG to write")
    args = ap.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(args.runs), figsize=(5.2 * len(args.runs), 3.8), dpi=110, squeeze=False)
    for ax, path in zip(axes[0], args.runs):
        with open(path, encoding="utf-8") as f:
            run = json.load(f)
        for label, losses in run["losses"].items():
            avg = moving_average(losses)
            ax.plot(range(len(losses) - len(avg) + 1, len(losses) + 1), avg, linewidth=2, label=label)
            print(f"{path}: {label}: mean loss of the last 20 steps {np.mean(losses[-20:]):.3f}")
        ax.set_title(f"{os.path.basename(run['data'])}, {run['steps']} steps", fontsize="medium")
        ax.set_xlabel("training step")
        ax.set_ylabel("training loss, 10-step moving average")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(args.out, format="png")
    plt.close(fig)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
