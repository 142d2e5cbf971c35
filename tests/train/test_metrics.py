"""The figures of an evaluation (``metrics.json``, ``eval.json``): the log loss of the true classes, and
per-class precision and recall read from the right axis of the confusion matrix (rows: true class,
columns: predicted class)."""

from __future__ import annotations

import numpy as np
import pytest

from carclf.train.evaluate import classification_report, confusion_matrix, metrics_for

IDS, NAMES = ["a", "b", "c"], ["Alpha", "Beta", "Gamma"]
# Six photos; rows 1, 2 and 4 are predicted wrong (the argmax is not the true class).
LABELS = np.array([0, 0, 0, 1, 1, 2])
PROBS = np.array([[0.7, 0.2, 0.1],
                  [0.3, 0.6, 0.1],
                  [0.1, 0.5, 0.4],
                  [0.2, 0.7, 0.1],
                  [0.1, 0.4, 0.5],
                  [0.2, 0.2, 0.6]], dtype=np.float32)
PREDICTED = np.array([0, 1, 1, 1, 2, 2])


def test_log_loss_is_the_mean_negative_log_probability_of_the_true_class():
    """Log loss scores the probability given to the true class, also on the rows the model got wrong (a loss
    of the predicted class would reward confident mistakes)."""
    metrics = metrics_for(PROBS, LABELS, IDS, NAMES)
    assert metrics["predicted"] == PREDICTED.tolist() and metrics["correct"] == 3
    true_class_probability = [0.7, 0.3, 0.1, 0.7, 0.4, 0.6]  # PROBS[row, LABELS[row]], read off the table
    expected = -np.mean(np.log(true_class_probability))
    assert metrics["log_loss"] == pytest.approx(expected, rel=1e-5)
    assert metrics["log_loss"] != pytest.approx(-np.mean(np.log(PROBS.max(axis=1))), rel=1e-3)


def test_precision_counts_the_predictions_and_recall_the_true_photos_of_a_class():
    """Precision of class k: right among the photos predicted k; recall: right among the photos that are k.
    Here they differ for every class, so swapping the matrix's axes shows."""
    matrix = confusion_matrix(LABELS, PREDICTED, 3)
    counted = [[np.sum((LABELS == t) & (PREDICTED == p)) for p in range(3)] for t in range(3)]
    np.testing.assert_array_equal(matrix, counted)  # rows are the true class, columns the predicted one
    rows = classification_report(matrix, IDS, NAMES)
    for k, row in enumerate(rows):
        right = np.sum((PREDICTED == k) & (LABELS == k))
        precision, recall = right / np.sum(PREDICTED == k), right / np.sum(LABELS == k)
        assert precision != pytest.approx(recall)
        assert row["class_id"] == IDS[k] and row["name"] == NAMES[k] and row["support"] == np.sum(LABELS == k)
        assert row["precision"] == pytest.approx(precision, abs=1e-4)
        assert row["recall"] == pytest.approx(recall, abs=1e-4)
        assert row["f1"] == pytest.approx(2 * precision * recall / (precision + recall), abs=1e-4)
    assert metrics_for(PROBS, LABELS, IDS, NAMES)["per_class"] == rows
