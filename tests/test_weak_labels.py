"""Tests of point labels and synthesised coarse labels."""

import hashlib

import numpy as np

from wsda_jax.data import weak_labels


def _label():
    label = np.zeros((40, 60), np.uint8)  # road
    label[:10] = 10  # sky
    label[20:30, 10:40] = 13  # car
    label[35:38, 50:53] = 5  # small pole (9 px)
    label[:, :3] = 255
    return label


def test_point_labels_k_per_class_on_class_pixels():
    label = _label()
    points = weak_labels.point_labels(label, points_per_class=3, seed=0, name_or_index="a")
    labelled = points != 255
    np.testing.assert_array_equal(points[labelled], label[labelled])
    for c in (0, 5, 10, 13):
        assert np.count_nonzero(points == c) == 3
    assert np.count_nonzero(labelled) == 12


def test_point_labels_deterministic_and_name_dependent():
    label = _label()
    a = weak_labels.point_labels(label, points_per_class=2, seed=0, name_or_index="aachen_1")
    b = weak_labels.point_labels(label, points_per_class=2, seed=0, name_or_index="aachen_1")
    c = weak_labels.point_labels(label, points_per_class=2, seed=0, name_or_index="aachen_2")
    d = weak_labels.point_labels(label, points_per_class=2, seed=1, name_or_index="aachen_1")
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    expected = int.from_bytes(hashlib.sha256(b"x").digest()[:8], "little") >> 1
    assert weak_labels.stable_seed("x") == expected  # Not Python's per-process hash().
    assert weak_labels.stable_seed(5) == weak_labels.stable_seed("5")


def test_point_labels_margin_and_fallback():
    label = _label()
    points = weak_labels.point_labels(label, points_per_class=20, seed=0, name_or_index=0, margin=3)
    ys, xs = np.nonzero(points == 13)
    assert ys.size == 20
    # The car spans rows 20..29 and columns 10..39: 3 px inside is rows 23..26, columns 13..36.
    assert ys.min() >= 23 and ys.max() <= 26 and xs.min() >= 13 and xs.max() <= 36
    # The 3x3 pole has no pixel 3 px inside: the fallback takes any of its 9 pixels.
    assert np.count_nonzero(points == 5) == 9


def test_point_labels_class_smaller_than_k():
    label = np.full((8, 8), 255, np.uint8)
    label[0, 0] = 4
    points = weak_labels.point_labels(label, points_per_class=5, seed=0, name_or_index="x")
    assert np.count_nonzero(points == 4) == 1 and np.count_nonzero(points != 255) == 1


def test_coarse_from_fine_agrees_and_drops_boundaries_and_small_regions():
    label = _label()
    coarse = weak_labels.coarse_from_fine(label, erosion=2, min_region=20)
    kept = coarse != 255
    np.testing.assert_array_equal(coarse[kept], label[kept])
    assert not np.any(coarse == 5)  # The 9 px pole erodes away.
    # The car shrinks by 2 px on each side: rows 22..27, columns 12..37.
    ys, xs = np.nonzero(coarse == 13)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (22, 27, 12, 37)
    assert coarse[21, 20] == 255 and coarse[18, 20] == 255 and coarse[15, 20] == 0
    assert 0.3 < kept.mean() < 0.9


def test_coarse_every_class_keeps_the_largest_region_of_an_erased_class():
    label = _label()
    eroded = weak_labels.coarse_from_fine(label, erosion=2, min_region=20)
    every = weak_labels.coarse_from_fine(label, erosion=2, min_region=20, every_class=True)
    np.testing.assert_array_equal(every == 5, label == 5)  # The pole, whole.
    others = label != 5
    np.testing.assert_array_equal(every[others], eroded[others])  # Nothing else changes.
    assert set(np.unique(every)) - {255} == set(np.unique(label)) - {255}
    # Of two erased regions of a class, only the larger is kept.
    label = np.zeros((20, 20), np.uint8)
    label[2:4, 2:4] = 1  # 4 px
    label[10:13, 10:13] = 1  # 9 px
    coarse = weak_labels.coarse_from_fine(label, erosion=2, min_region=10, every_class=True)
    assert np.count_nonzero(coarse == 1) == 9 and coarse[2, 2] == 255


def test_coarse_min_region_drops_small_components():
    label = np.zeros((20, 20), np.uint8)
    label[2:5, 2:5] = 1  # 9 px
    label[10:18, 10:18] = 1  # 64 px
    coarse = weak_labels.coarse_from_fine(label, erosion=0, min_region=10)
    assert np.count_nonzero(coarse == 1) == 64
    assert coarse[3, 3] == 255


def test_coarse_parameters_scale_with_size():
    assert weak_labels.coarse_parameters(1024, 2048) == (16, 1048)
    assert weak_labels.coarse_parameters(32, 64) == (1, 4)
