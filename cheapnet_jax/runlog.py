"""A training run's record: ``metrics.jsonl`` (a line per epoch), TensorBoard event files
(tensorboardX, no TensorFlow needed) and ``curves.png``."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path


class MetricsLog:
    """metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and a PNG plot."""

    def __init__(self, workdir: Path):
        from tensorboardX import SummaryWriter

        self.workdir = workdir
        self.jsonl = workdir / "metrics.jsonl"
        self.writer = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, figures: Mapping) -> None:
        with self.jsonl.open("a") as file:
            file.write(json.dumps(figures) + "\n")
        step = figures["step"]
        self.writer.add_scalar("train/loss", figures["train_loss"], step)
        self.writer.add_scalar("train/lr", figures["lr"], step)
        for name in ("miou", "iou_defect", "macc", "pixel_acc"):
            self.writer.add_scalar(f"validation/{name}", figures["validation"][name], step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()

    def plot(self) -> None:
        if not self.jsonl.is_file():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = [json.loads(line) for line in self.jsonl.read_text().splitlines() if line]
        epochs = [row["epoch"] + 1 for row in rows]
        figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
        left.plot(epochs, [row["train_loss"] for row in rows])
        left.set(xlabel="epoch", ylabel="train BCE", yscale="log", title="training loss")
        for name in ("miou", "iou_defect"):
            right.plot(epochs, [row["validation"][name] for row in rows], label=name)
        right.set(xlabel="epoch", title="validation", ylim=(0, 1))
        right.legend()
        figure.tight_layout()
        figure.savefig(self.workdir / "curves.png", dpi=100)
        plt.close(figure)
