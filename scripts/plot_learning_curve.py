"""Draw a model's learning curves: training loss (from its training log) and validation scores (from ``model.json``).

Usage: python scripts/plot_learning_curve.py MODEL_DIR TRAINING_LOG OUT.png
The training log is the INFO output of ``python -m epvsseg.train`` (lines ``it N loss L``); the validation
scores are the ``training.history`` of ``model.json`` (cluster F1 and Dice per combination at the recipe's
threshold of 0.5, on the recipe's own validation crops).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

_LOSS = re.compile(r" it (\d+) loss ([0-9.]+)")


def read_loss(log: Path) -> tuple[list[int], list[float]]:
    """(iterations, losses) of every ``it N loss L`` line."""
    pairs = [(int(m[1]), float(m[2])) for m in map(_LOSS.search, log.read_text().splitlines()) if m]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def plot(model_dir: Path, log: Path, out: Path) -> None:
    spec = json.loads((model_dir / "model.json").read_text())
    history = spec["training"]["history"]
    its, loss = read_loss(log)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax1.plot(its, loss, lw=0.6, color="0.7", label="every 50 iterations")
    k = 10
    ax1.plot(its[k - 1:], [sum(loss[i - k + 1:i + 1]) / k for i in range(k - 1, len(loss))], color="k",
             label=f"running mean of {k}")
    ax1.legend(fontsize=7)
    ax1.set(xlabel="iteration", ylabel="training loss (Dice + BCE, per batch)", title="training loss")
    for combination in history[0]["val"]:
        x = [h["iteration"] for h in history]
        ax2.plot(x, [h["val"][combination]["cluster_f1"] for h in history], marker="o", label=combination)
    ax2.set(xlabel="iteration", ylabel="cluster F1 (validation crops)", title="validation", ylim=(0, 1))
    ax2.legend(fontsize=7)
    fig.suptitle(f"{spec['model_id']}: learning curves", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    plot(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
