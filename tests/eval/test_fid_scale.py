"""The digits FID's real-data scale: stratified splits, bootstrap copies, the 1/n extrapolation."""

import torch

from stepdistill.data.digits import load_digits_tensors
from stepdistill.eval.fid_scale import (
    copy_fid,
    fresh_sample_fid,
    nearest_distances,
    stratified_bootstrap,
    stratified_disjoint,
)


def test_stratified_disjoint_keeps_class_proportions_and_shares_nothing():
    labels = torch.tensor([0] * 60 + [1] * 30 + [2] * 10)
    first, second = stratified_disjoint(labels, 20, seed=3)
    assert set(first.tolist()).isdisjoint(second.tolist())
    for part in (first, second):
        assert torch.bincount(labels[part], minlength=3).tolist() == [12, 6, 2]
    again, _ = stratified_disjoint(labels, 20, seed=3)
    assert torch.equal(first, again)


def test_stratified_disjoint_rejects_sizes_it_cannot_split():
    labels = torch.zeros(10, dtype=torch.long)
    for n in (0, 6):
        try:
            stratified_disjoint(labels, n, seed=0)
        except ValueError as err:
            assert "n_per_side" in str(err)
        else:
            raise AssertionError(f"n_per_side={n} was accepted")


def test_stratified_bootstrap_keeps_every_class_count():
    labels = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    picks = stratified_bootstrap(labels, seed=1)
    assert torch.bincount(labels[picks]).tolist() == [7, 3, 5]
    assert len(set(picks.tolist())) < len(labels)  # with replacement: some digits repeat


def test_real_digits_fid_scale_orders_copies_below_fresh_samples():
    images, labels = load_digits_tensors()
    fresh = fresh_sample_fid(images, labels, sizes=(225, 450, 898), seeds=range(3))
    means = [m for m, _ in fresh["by_size"].values()]
    assert means[0] > means[1] > means[2]  # FID's finite-sample bias shrinks with n
    assert fresh["fit"]["c"] > 0
    copies = copy_fid(images, labels, seeds=range(3))
    # a resample of the reference scores below a fresh sample of the same size (measured: ~0.14 vs ~0.3)
    full = fresh["at_full_size"]
    assert max(copies) < min(full.values())
    assert all(0.05 < v < 1.0 for v in full.values())
    assert full["largest_n"] == fresh["by_size"][898][0] * 898 / len(images)


def test_nearest_distances_find_copies_and_leave_one_out():
    reference = torch.tensor([[0.0, 0.0], [3.0, 4.0], [6.0, 8.0]])
    torch.testing.assert_close(nearest_distances(reference, reference), torch.zeros(3, dtype=torch.float64))
    torch.testing.assert_close(nearest_distances(reference, reference, exclude_self=True),
                               torch.tensor([5.0, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(nearest_distances(torch.tensor([[0.0, 1.0]]), reference),
                               torch.tensor([1.0], dtype=torch.float64))
