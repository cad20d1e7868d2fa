"""Tests of the procedural two-domain street scenes."""

import numpy as np
import pytest

from wsda_jax import classes
from wsda_jax.data import synthetic


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
@pytest.mark.parametrize("height,width", [(64, 128), (128, 256)])
def test_dtype_shape_and_label_range(domain, height, width):
    example = synthetic.render_example(domain, 3, seed=0, height=height, width=width)
    assert set(example) == {"image", "label"}
    assert example["image"].dtype == np.uint8 and example["image"].shape == (height, width, 3)
    assert example["label"].dtype == np.uint8 and example["label"].shape == (height, width)
    assert example["label"].max() < classes.NUM_CLASSES  # no ignore pixels in the scenes


@pytest.mark.parametrize("domain", synthetic.DOMAINS)
def test_at_least_eight_classes_per_image(domain):
    seen = set()
    for index in range(25):
        label = synthetic.render_example(domain, index, seed=1, height=64, width=128)["label"]
        present = np.unique(label)
        assert len(present) >= 8, (index, present)
        seen.update(present.tolist())
    assert len(seen) == classes.NUM_CLASSES  # every class occurs somewhere


def test_deterministic_by_domain_index_seed():
    def render(domain, index, seed):
        return synthetic.render_example(domain, index, seed=seed, height=64, width=128)

    a, b = render("target", 7, 0), render("target", 7, 0)
    np.testing.assert_array_equal(a["image"], b["image"])
    np.testing.assert_array_equal(a["label"], b["label"])
    assert not np.array_equal(a["label"], render("target", 8, 0)["label"])
    assert not np.array_equal(a["label"], render("target", 7, 1)["label"])
    assert not np.array_equal(a["label"], render("source", 7, 0)["label"])


def test_source_is_flat_palette():
    example = synthetic.render_example("source", 0, seed=0, height=64, width=128)
    expected = synthetic.SOURCE_COLOURS[example["label"]].astype(np.uint8)
    np.testing.assert_array_equal(example["image"], expected)


def test_domains_differ_in_colour_for_the_same_layout():
    label, instance = synthetic.render_layout(np.random.default_rng(0), 128, 256)
    source = synthetic.paint_source(label).astype(np.float32)
    target = synthetic.paint_target(label, instance, np.random.default_rng(1)).astype(np.float32)
    distances = []
    for cls in np.unique(label):
        mask = label == cls
        assert source[mask].std(axis=0).max() == 0  # flat colour
        if mask.sum() > 50:
            assert target[mask].std(axis=0).max() > 2  # texture, lighting and noise
        distances.append(np.linalg.norm(source[mask].mean(0) - target[mask].mean(0)))
    assert np.median(distances) > 30


def test_source_colours_do_not_classify_target_pixels():
    """The gap is real: nearest source colour labels few target pixels correctly."""
    correct = []
    for index in range(5):
        example = synthetic.render_example("target", index, seed=0, height=64, width=128)
        pixels = example["image"].reshape(-1, 1, 3).astype(np.float32)
        nearest = ((pixels - synthetic.SOURCE_COLOURS[None]) ** 2).sum(-1).argmin(-1)
        correct.append(np.mean(nearest == example["label"].ravel()))
    assert np.mean(correct) < 0.4


def test_unknown_domain_raises():
    with pytest.raises(ValueError, match="domain"):
        synthetic.render_example("real", 0, seed=0, height=32, width=64)
