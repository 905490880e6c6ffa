"""Metrics: classification (bag/instance, thresholds), pixel/segmentation, graph smoothness."""

from milkit.metrics.classification import auroc, binary_metrics, choose_threshold

__all__ = ["auroc", "binary_metrics", "choose_threshold"]
