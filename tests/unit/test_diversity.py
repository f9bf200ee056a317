"""Diversity measures on hand-computed examples."""

import math

import pytest
import torch

from stepdistill.eval.diversity import (
    class_diversity,
    class_knn_recall,
    knn_radii,
    knn_recall,
    pairwise_diversity,
    per_class_diversity,
)

# class 0: a 3-4-5 triangle (mean pair distance 4); class 1: two points 1 apart; class 2: alone
POINTS = torch.tensor([[0.0, 0.0], [3.0, 0.0], [0.0, 4.0], [1.0, 1.0], [1.0, 2.0], [9.0, 9.0]])
LABELS = torch.tensor([0, 0, 0, 1, 1, 2])


def test_pairwise_diversity_of_a_triangle_and_a_collapsed_set():
    assert pairwise_diversity(POINTS[:3]) == pytest.approx(4.0)
    assert pairwise_diversity(torch.ones(5, 3)) == 0.0
    # images are flattened: two 1x2x2 "images" differing by 1 in every pixel are 2 apart
    assert pairwise_diversity(torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="at least 2"):
        pairwise_diversity(POINTS[:1])


def test_class_diversity_averages_classes_equally_and_skips_singletons():
    assert per_class_diversity(POINTS, LABELS) == pytest.approx({0: 4.0, 1: 1.0})
    assert class_diversity(POINTS, LABELS) == pytest.approx(2.5)  # not (3 * 4 + 1 * 1) / 4 pairs
    # the distance between classes does not count: moving class 1 far away changes nothing
    moved = POINTS.clone()
    moved[3:5] += 100.0
    assert class_diversity(moved, LABELS) == pytest.approx(2.5)
    with pytest.raises(ValueError, match="undefined"):
        class_diversity(POINTS[:1], LABELS[:1])


def test_knn_radii_and_recall_on_a_line():
    fake = torch.tensor([[0.0], [1.0], [3.0]])
    assert knn_radii(fake, 1).tolist() == [1.0, 1.0, 2.0]
    assert knn_radii(fake, 2).tolist() == [3.0, 2.0, 3.0]
    # 0.5 (inside the ball of 0), 2 (of 3, radius 2) are covered; 6 and -2 are not
    real = torch.tensor([[0.5], [2.0], [6.0], [-2.0]])
    assert knn_recall(real, fake, k=1) == pytest.approx(0.5)
    assert knn_recall(real, fake, k=2) == pytest.approx(1.0)  # -2 is 2 from 1 (radius 2); 6 is 3 from 3
    with pytest.raises(ValueError, match="k=3"):
        knn_radii(fake, 3)


def test_a_collapsed_generator_has_low_recall():
    angles = torch.linspace(0, 2 * math.pi, 9)[:-1]
    real = torch.stack([angles.cos(), angles.sin()], dim=1)
    collapsed = real[:1] + 0.01 * torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    assert knn_recall(real, real, k=1) == 1.0
    assert knn_recall(real, collapsed, k=1) == pytest.approx(1 / 8)


def test_class_knn_recall_averages_over_classes():
    fake = torch.tensor([[0.0], [1.0], [3.0], [10.0], [11.0]])
    fake_labels = torch.tensor([0, 0, 0, 1, 1])
    real = torch.tensor([[0.5], [2.0], [6.0], [-2.0], [10.5], [20.0]])
    real_labels = torch.tensor([0, 0, 0, 0, 1, 1])
    # class 0: 1/2 (above); class 1: radius 1 each, 10.5 covered, 20 not -> 1/2; a class-1 point
    # next to class 0's fakes would not count for class 0
    assert class_knn_recall(real, real_labels, fake, fake_labels, k=1) == pytest.approx(0.5)
    assert class_knn_recall(torch.tensor([[0.5]]), torch.tensor([1]), fake, fake_labels, k=1) == 0.0
    with pytest.raises(ValueError, match="no class"):
        class_knn_recall(real, real_labels, fake[:2], torch.tensor([0, 1]), k=1)
