"""Training curves: per-epoch losses and validation NDCG@10, drawn headless (matplotlib Agg)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend must be chosen first)


def plot_history(history: list[dict], path: Path, metric: str) -> None:
    """Left: every training loss the model reports; right: validation `metric` per ranker."""
    epochs = [h["epoch"] for h in history]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name in history[0]["train"]:
        left.plot(epochs, [h["train"][name] for h in history], marker="o", label=name)
    left.set(title="training losses", xlabel="epoch", ylabel="mean loss")
    for ranker in history[0]["val"]:
        right.plot(epochs, [h["val"][ranker][metric] for h in history], marker="o", label=ranker)
    right.set(title=f"validation {metric}", xlabel="epoch", ylabel=metric)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)
