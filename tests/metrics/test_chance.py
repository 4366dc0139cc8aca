"""Chance levels printed beside each demo number (issue #23)."""
import numpy as np
import pytest

from medjax.metrics.chance import (balanced_accuracy_chance, majority_fraction, recall_at_k_chance,
                                   weighted_f1_chance)
from medjax.tasks.base import markdown_table


def test_chance_levels_of_an_input_blind_predictor():
    labels = np.array([0, 0, 0, 1, 2, 2])
    assert majority_fraction(labels) == 0.5
    assert balanced_accuracy_chance(labels) == pytest.approx(1 / 3)
    assert weighted_f1_chance(labels) == pytest.approx(0.5 * 2 * 0.5 / 1.5)  # majority class: P 0.5, R 1
    assert recall_at_k_chance(5, 32) == 5 / 32 and recall_at_k_chance(5, 3) == 1.0


def test_markdown_table_shows_each_chance_level_beside_its_metric():
    results = {"auc": 0.81, "accuracy": 0.6, "examples": 40.0, "auc_chance": 0.5, "accuracy_chance": 0.45}
    table = markdown_table("mrm_aptos", [("10%", results)], percent=("auc", "accuracy"))
    assert table.splitlines()[0] == "| Method | 10% auc | 10% accuracy |"
    assert table.splitlines()[2] == "| medjax mrm_aptos | 81.00 (chance 50.00) | 60.00 (chance 45.00) |"
