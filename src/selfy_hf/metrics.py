"""Classification metrics computed directly (no Hub download): top-k accuracy, mean class accuracy, confusion."""

from __future__ import annotations

import torch


def confusion_matrix(predictions: torch.Tensor, labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """`(num_labels, num_labels)` counts; row = true label, column = predicted label."""
    flat = labels.long() * num_labels + predictions.long()
    return torch.bincount(flat, minlength=num_labels * num_labels).reshape(num_labels, num_labels)


def classification_metrics(
    logits: torch.Tensor, labels: torch.Tensor, top_k: tuple[int, ...] = (1, 5)
) -> dict:
    """
    Top-k accuracies (`top1`, `top5`, in [0, 1]; k is capped at the number of classes), `mean_class_accuracy` (the
    average of per-class recalls over the classes present, FineGym's "Mean"), and `num_samples`.
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
    return results


__all__ = ["classification_metrics", "confusion_matrix"]
