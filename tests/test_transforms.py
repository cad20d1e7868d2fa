"""Tests of the host-side numpy transforms."""

import numpy as np
import pytest

from wsda_jax.data import transforms


def _example(height=32, width=48, seed=0):
    rng = np.random.default_rng(seed)
    label = rng.choice(np.array([0, 3, 7, 255], np.uint8), size=(height, width))
    return {
        "image": rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        "label": label,
        "weak_label": np.where(rng.uniform(size=(height, width)) < 0.2, label, 255).astype(
            np.uint8
        ),
        "presence": np.array([1, 0, 1], np.uint8),
    }


@pytest.mark.parametrize("scale", [0.5, 0.77, 1.0, 1.6, 2.0])
def test_scale_crop_labels_keep_valid_values(scale):
    example = _example()
    out = transforms.scale_crop(example, scale, 0, 0, (24, 40))
    for key in ("label", "weak_label"):
        assert out[key].dtype == np.uint8 and out[key].shape == (24, 40)
        assert set(np.unique(out[key])) <= set(np.unique(example[key])) | {255}
    assert out["image"].dtype == np.uint8 and out["image"].shape == (24, 40, 3)
    np.testing.assert_array_equal(out["presence"], example["presence"])


@pytest.mark.parametrize("scale,top,left", [(1.6, 5, 9), (2.0, 17, 30), (0.8, 0, 3)])
def test_scale_crop_matches_resize_then_crop(scale, top, left):
    # 40 px sides and these scales put no sample exactly between two source pixels,
    # where Pillow's whole-image and windowed nearest resizes may break ties differently.
    example = _example(height=40, width=40)
    size = round(40 * scale)
    full = transforms.resize(example, size, size)
    crop_h, crop_w = min(16, size - top), min(20, size - left)
    out = transforms.scale_crop(example, scale, top, left, (crop_h, crop_w))
    expected = full["label"][top : top + crop_h, left : left + crop_w]
    np.testing.assert_array_equal(out["label"], expected)
    expected = full["image"][top : top + crop_h, left : left + crop_w].astype(int)
    assert np.abs(out["image"].astype(int) - expected).mean() < 2.0


def test_scale_identity_is_a_plain_crop():
    example = _example()
    out = transforms.scale_crop(example, 1.0, 4, 6, (16, 20))
    np.testing.assert_array_equal(out["image"], example["image"][4:20, 6:26])
    np.testing.assert_array_equal(out["weak_label"], example["weak_label"][4:20, 6:26])


def test_crop_padding_uses_zero_and_ignore():
    example = _example(height=20, width=30)
    example["label"][:] = 3
    example["image"][:] = 200
    out = transforms.scale_crop(example, 1.0, 0, 0, (32, 40))
    assert (out["image"][:20, :30] == 200).all()
    assert (out["image"][20:] == 0).all() and (out["image"][:, 30:] == 0).all()
    assert (out["label"][:20, :30] == 3).all()
    assert (out["label"][20:] == 255).all() and (out["label"][:, 30:] == 255).all()


def test_random_scale_crop_output_size_and_determinism():
    transform = transforms.RandomScaleCrop((0.5, 2.0), (24, 24))
    example = _example()
    scales_seen = set()
    for seed in range(8):
        a = transform.random_map(example, np.random.default_rng(seed))
        b = transform.random_map(example, np.random.default_rng(seed))
        assert a["image"].shape == (24, 24, 3) and a["label"].shape == (24, 24)
        np.testing.assert_array_equal(a["image"], b["image"])
        scales_seen.add(a["image"].tobytes())
    assert len(scales_seen) > 1


def test_flip_moves_image_and_all_labels_together():
    example = _example()
    out = transforms.flip(example)
    for key in ("image", "label", "weak_label"):
        np.testing.assert_array_equal(out[key], example[key][:, ::-1])
    np.testing.assert_array_equal(transforms.flip(out)["label"], example["label"])
    flipped = [
        not np.array_equal(
            transforms.RandomFlip().random_map(example, np.random.default_rng(s))["image"],
            example["image"],
        )
        for s in range(32)
    ]
    assert 4 < sum(flipped) < 28


def test_resize_labels_nearest():
    example = _example()
    out = transforms.resize(example, 50, 70)
    assert out["image"].shape == (50, 70, 3) and out["label"].shape == (50, 70)
    assert set(np.unique(out["label"])) <= set(np.unique(example["label"]))
