"""Classification metrics computed directly (no Hub download): top-k accuracy, mean class accuracy, confusion."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`(num_labels, num_labels)` counts; row = true label, column = predicted label."""
    flat = labels.long() * num_labels + predictions.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def pair_accuracy(logits: torch.Tensor, labels: torch.Tensor, label_pairs: Sequence[Sequence[int]]) -> float:
    """
    How often the true class outscores its partner, over the videos whose label belongs to one of `label_pairs`
    (e.g. "moving left" / "moving right"): the accuracy of telling the time direction once the motion is known.
    An order-blind model sits at 0.5 (ties count half). NaN when no label belongs to a pair.
    """
    partner = torch.full((logits.shape[1],), -1, dtype=torch.long)
    for first, second in label_pairs:
        partner[first], partner[second] = second, first
    labels = labels.long().cpu()
    paired = partner[labels] >= 0
    if not paired.any():
        return float("nan")
    rows = torch.arange(labels.numel())[paired]
    own = logits[rows, labels[paired]]
    other = logits[rows, partner[labels[paired]]]
    return ((own > other).float() + 0.5 * (own == other).float()).mean().item()  # a tie is a coin toss


def classification_metrics(
    logits: torch.Tensor,
    labels: torch.Tensor,
    top_k: tuple[int, ...] = (1, 5),
    label_pairs: Sequence[Sequence[int]] | None = None,
) -> dict:
    """
    Top-k accuracies (`top1`, `top5`, in [0, 1]; k is capped at the number of classes), `mean_class_accuracy` (the
    average of per-class recalls over the classes present, FineGym's "Mean"), `num_samples`, and with `label_pairs`
    the `pair_accuracy` (see [`pair_accuracy`]).
    """
    logits, labels = logits.detach().float().cpu(), labels.detach().long().cpu()
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits (N, num_labels) and labels (N,), got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    num_labels = logits.shape[1]
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_labels):
        raise ValueError(
            f"labels must lie in [0, {num_labels}), got values from {labels.min()} to {labels.max()}"
        )
    ranked = logits.topk(min(max(top_k), num_labels), dim=1).indices
    hits = ranked == labels[:, None]
    results = {f"top{k}": hits[:, : min(k, num_labels)].any(dim=1).float().mean().item() for k in top_k}
    confusion = confusion_matrix(ranked[:, 0], labels, num_labels)
    per_class_total = confusion.sum(dim=1)
    present = per_class_total > 0
    recalls = confusion.diagonal()[present].float() / per_class_total[present].float()
    results["mean_class_accuracy"] = recalls.mean().item() if present.any() else float("nan")
    results["num_samples"] = int(labels.numel())
    if label_pairs:
        results["pair_accuracy"] = pair_accuracy(logits, labels, label_pairs)
    return results


__all__ = ["classification_metrics", "confusion_matrix", "pair_accuracy"]
