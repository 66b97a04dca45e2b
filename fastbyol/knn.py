"""The kNN evaluation, now in fastbyol.evaluation.features; its names stay importable from here."""

from .evaluation.features import extract_features, knn_accuracy, knn_predict, knn_top1  # noqa: F401
