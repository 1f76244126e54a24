"""Recall accuracy, overall, per number of kv pairs and per query distance bucket."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch

from bmojo.data.synthetic import IGNORE_INDEX, RecallBatch
from bmojo.models.lm import LanguageModel


def distance_bucket(distance: int) -> str:
    """Power-of-two bucket of a query distance: ``"1-1"``, ``"2-3"``, ``"4-7"``, ..."""
    low = 1 << (max(distance, 1).bit_length() - 1)
    return f"{low}-{2 * low - 1}"


@dataclass
class RecallReport:
    accuracy: float
    num_queries: int
    by_kv_pairs: dict[int, float] = field(default_factory=dict)
    by_distance: dict[str, float] = field(default_factory=dict)
    far_accuracy: float | None = None  # queries at least ``far_from`` positions after their key

    def format(self) -> str:
        lines = [f"accuracy {self.accuracy:.4f} over {self.num_queries:,} queries"]
        if self.far_accuracy is not None:
            lines.append(f"far-query accuracy {self.far_accuracy:.4f}")
        lines.append("by kv pairs: " + ", ".join(f"{k}: {v:.3f}" for k, v in sorted(self.by_kv_pairs.items())))
        buckets = sorted(self.by_distance.items(), key=lambda kv: int(kv[0].split("-")[0]))
        lines.append("by distance: " + ", ".join(f"{k}: {v:.3f}" for k, v in buckets))
        return "\n".join(lines)


@torch.no_grad()
def evaluate_recall(model: LanguageModel, batches: list[RecallBatch], batch_size: int = 64,
                    far_from: int | None = None) -> RecallReport:
    """Greedy accuracy at every labelled position of ``batches`` (labels aligned with inputs)."""
    model.eval()
    device = next(model.parameters()).device
    correct: dict[tuple[str, object], int] = defaultdict(int)
    total: dict[tuple[str, object], int] = defaultdict(int)
    for dataset in batches:
        for mb in dataset.minibatches(batch_size):
            mb = mb.to(device)
            predicted = model(mb.inputs).logits.argmax(-1)  # [B, L]
            mask = mb.labels != IGNORE_INDEX
            hits = (predicted == mb.labels) & mask
            for row in range(len(mb)):
                pairs = int(mb.num_kv_pairs[row])
                for dist, hit in zip(mb.distances[row][mask[row]].tolist(), hits[row][mask[row]].tolist(),
                                     strict=True):
                    keys = [("all", None), ("pairs", pairs), ("dist", distance_bucket(dist))]
                    if far_from is not None and dist >= far_from:
                        keys.append(("far", None))
                    for key in keys:
                        total[key] += 1
                        correct[key] += hit
    if not total:
        raise ValueError("no labelled positions to evaluate")

    def acc(key):
        return correct[key] / total[key]

    return RecallReport(
        accuracy=acc(("all", None)), num_queries=total[("all", None)],
        by_kv_pairs={k: acc((kind, k)) for kind, k in total if kind == "pairs"},
        by_distance={k: acc((kind, k)) for kind, k in total if kind == "dist"},
        far_accuracy=acc(("far", None)) if ("far", None) in total else None,
    )
