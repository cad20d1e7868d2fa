"""Tests of wsda_jax.metrics against hand-computed examples."""

import functools

import jax
import numpy as np
import numpy_reference as ref
import pytest

from wsda_jax import metrics

# 3 classes. Ground truth (rows) vs prediction (cols), counted by hand:
#   label: 0 0 0 1 1 2 255 2   pred: 0 1 0 1 7 0 2 2
#   (0,0) x2, (0,1) x1, (1,1) x1, (2,0) x1, (2,2) x1; pred 7 and label 255 dropped.
LABEL = np.array([[[0, 0, 0, 1], [1, 2, 255, 2]]], np.int32)
PRED = np.array([[[0, 1, 0, 1], [7, 0, 2, 2]]], np.int32)
EXPECTED = np.array([[2, 1, 0], [0, 1, 0], [1, 0, 1]], np.int64)


def test_confusion_matrix_by_hand():
    confusion = metrics.confusion_matrix(PRED, LABEL, 3)
    assert confusion.dtype == np.int64
    np.testing.assert_array_equal(confusion, EXPECTED)


def test_batch_confusion_matrix_matches_host_version_and_masks_images():
    fn = jax.jit(functools.partial(metrics.batch_confusion_matrix, num_classes=3))
    np.testing.assert_array_equal(fn(PRED, LABEL), EXPECTED)
    rng = np.random.default_rng(0)
    label = np.where(rng.random((3, 5, 6)) < 0.2, 255, rng.integers(0, 3, (3, 5, 6)))
    pred = rng.integers(0, 4, (3, 5, 6))
    mask = np.array([True, False, True])
    got = fn(pred, label, mask=mask)
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, ref.confusion_matrix(pred[mask], label[mask], 3))
    np.testing.assert_array_equal(
        metrics.confusion_matrix(pred, label, 3), ref.confusion_matrix(pred, label, 3)
    )


def test_iou_and_mean_iou_by_hand():
    confusion = np.zeros((4, 4), np.int64)
    confusion[:3, :3] = EXPECTED  # class 3 never occurs
    # IoU = TP / (row + col - TP): class 0: 2 / (3 + 3 - 2), class 1: 1 / (1 + 2 - 1),
    # class 2: 1 / (2 + 1 - 1).
    expected = np.array([0.5, 0.5, 0.5, np.nan])
    per_class = metrics.iou(confusion)
    np.testing.assert_allclose(per_class, expected)
    assert np.isnan(per_class[3])
    assert metrics.mean_iou(confusion) == pytest.approx(0.5)
    confusion[3, 0] = 2  # class 3 in ground truth, never predicted: IoU 0
    assert metrics.iou(confusion)[3] == 0.0
    # class 0: 2 / (3 + 5 - 2); subset (0, 3) = mean(1/3, 0)
    assert metrics.mean_iou(confusion, class_subset=(0, 3)) == pytest.approx(1 / 6)
    assert np.isnan(metrics.mean_iou(np.zeros((2, 2), np.int64)))


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="pred"):
        metrics.confusion_matrix(PRED[:, :1], LABEL, 3)
    with pytest.raises(ValueError, match="confusion"):
        metrics.iou(np.zeros((2, 3)))
    with pytest.raises(ValueError, match="class_subset"):
        metrics.mean_iou(EXPECTED, class_subset=(5,))
    with pytest.raises(ValueError, match="mask"):
        metrics.batch_confusion_matrix(PRED, LABEL, 3, mask=np.ones(2, bool))
