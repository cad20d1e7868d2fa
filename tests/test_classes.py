"""Tests of the class table against docs/method.md §2."""

import numpy as np

from wsda_jax import classes

# docs/method.md §2, written out independently of the table.
CITYSCAPES = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10,
              24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}  # fmt: skip
SYNTHIA = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 16: 9, 1: 10, 10: 11,
           17: 12, 8: 13, 18: 14, 19: 15, 20: 16, 12: 17, 11: 18}  # fmt: skip


def test_cityscapes_lookup_matches_method():
    expected = np.full(256, 255, np.uint8)
    for source_id, train_id in CITYSCAPES.items():
        expected[source_id] = train_id
    np.testing.assert_array_equal(classes.CITYSCAPES_ID_TO_TRAIN, expected)
    assert classes.CITYSCAPES_ID_TO_TRAIN.dtype == np.uint8


def test_synthia_lookup_matches_method():
    expected = np.full(256, 255, np.uint8)
    for source_id, train_id in SYNTHIA.items():
        expected[source_id] = train_id
    np.testing.assert_array_equal(classes.SYNTHIA_ID_TO_TRAIN, expected)


def test_names_palette_and_subsets():
    assert len(classes.CLASS_NAMES) == 19
    assert classes.CLASS_NAMES[0] == "road" and classes.CLASS_NAMES[18] == "bicycle"
    assert classes.CLASS_NAMES[13] == "car"
    assert classes.PALETTE.shape == (256, 3) and classes.PALETTE.dtype == np.uint8
    np.testing.assert_array_equal(classes.PALETTE[0], (128, 64, 128))
    np.testing.assert_array_equal(classes.PALETTE[13], (0, 0, 142))
    np.testing.assert_array_equal(classes.PALETTE[255], (0, 0, 0))
    assert len({tuple(c) for c in classes.PALETTE[:19]}) == 19

    def names(subset):
        return [classes.CLASS_NAMES[c] for c in subset]

    # docs/method.md §1: SYNTHIA's 16 classes leave out terrain, truck and train; the
    # 13 also wall, fence and pole. Both in train-id order.
    assert [n for n in classes.CLASS_NAMES if n not in names(classes.SYNTHIA_16)] == [
        "terrain",
        "truck",
        "train",
    ]
    assert [n for n in names(classes.SYNTHIA_16) if n not in names(classes.SYNTHIA_13)] == [
        "wall",
        "fence",
        "pole",
    ]
    assert list(classes.SYNTHIA_16) == sorted(classes.SYNTHIA_16)
    assert list(classes.SYNTHIA_13) == sorted(classes.SYNTHIA_13)


def test_map_labels_counts_out_of_map_ids():
    ids = np.array([[7, 0, 26], [34, 250, 33]], np.uint8)
    mapped, out = classes.map_labels(
        ids, classes.CITYSCAPES_ID_TO_TRAIN, classes.CITYSCAPES_KNOWN_IDS
    )
    np.testing.assert_array_equal(mapped, [[0, 255, 13], [255, 255, 18]])
    assert mapped.dtype == np.uint8
    assert out == 2  # 34 and 250; id 0 (unlabeled) is a known id that maps to ignore.


def test_map_labels_uint16_ids_beyond_lookup():
    ids = np.array([3, 300, 65535, 23], np.uint16)
    mapped, out = classes.map_labels(ids, classes.SYNTHIA_ID_TO_TRAIN, classes.SYNTHIA_KNOWN_IDS)
    np.testing.assert_array_equal(mapped, [0, 255, 255, 255])
    assert out == 3
    mapped, out = classes.map_labels(ids, classes.SYNTHIA_ID_TO_TRAIN)
    assert out == 2  # Without `known`, only ids beyond the table are out of map.


def test_colorize():
    label = np.array([[0, 255]], np.uint8)
    np.testing.assert_array_equal(classes.colorize(label), [[[128, 64, 128], [0, 0, 0]]])
