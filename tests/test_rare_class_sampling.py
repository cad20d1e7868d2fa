"""Rare class sampling: the distribution against DAFormer's formula, determinism, resumption,
and the statistics file kept beside the prepared dataset."""

import json
import math
import os

import numpy as np
import pytest
from pipeline_records import TARGET, assert_batches_equal, pipeline_config, take

from wsda_jax.data import pipeline, rare_class_sampling, records, transforms

# Per-image class pixel counts of a 6-image, 4-class fixture (class 3 never occurs).
PIXELS = np.asarray(
    [
        [900, 10, 0, 0],
        [800, 0, 30, 0],
        [950, 4, 0, 0],
        [700, 40, 60, 0],
        [1000, 0, 0, 0],
        [600, 0, 5, 0],
    ],
    np.int64,
)
TEMPERATURE, MIN_PIXELS = 0.05, 4


class _Rcs:
    enabled = True
    temperature = TEMPERATURE
    min_pixels = MIN_PIXELS


def _expected_image_probabilities():
    """DAFormer's two draws written out: P(c) = exp((1 - f_c)/T) / sum_k exp((1 - f_k)/T)
    over the classes present, then uniform over images with more than MIN_PIXELS of c."""
    totals = PIXELS.sum(axis=0)
    present = [c for c in range(4) if totals[c] > 0]
    freq = {c: totals[c] / sum(totals[k] for k in present) for c in present}
    norm = sum(math.exp((1 - freq[k]) / TEMPERATURE) for k in present)
    probs = np.zeros(len(PIXELS))
    for c in present:
        images = [i for i in range(len(PIXELS)) if PIXELS[i, c] > MIN_PIXELS]
        for i in images:
            probs[i] += math.exp((1 - freq[c]) / TEMPERATURE) / norm / len(images)
    return probs


def test_class_probabilities_are_the_tempered_softmax():
    class_ids, probs = rare_class_sampling.class_probabilities(PIXELS, TEMPERATURE)
    np.testing.assert_array_equal(class_ids, [0, 1, 2])
    totals = PIXELS.sum(axis=0)[:3] / PIXELS.sum()
    expected = np.exp((1 - totals) / TEMPERATURE)
    np.testing.assert_allclose(probs, expected / expected.sum(), rtol=1e-12)
    assert probs[1] > probs[2] > probs[0]  # Rarer classes are drawn more often.


def test_sampled_image_frequencies_match_the_formula():
    """20,000 draws: each image's count is within 5 binomial standard deviations."""
    ds = rare_class_sampling.rare_class_dataset(range(len(PIXELS)), PIXELS, _Rcs, seed=7)
    draws = 20_000
    counts = np.bincount([ds[k][0] for k in range(draws)], minlength=len(PIXELS))
    expected = _expected_image_probabilities()
    # Image 2's 4 px of class 1 are not more than 4: only the common class 0 draws it.
    assert expected[2] < 1e-6 and counts[2] == 0
    std = np.sqrt(draws * expected * (1 - expected))
    assert np.all(np.abs(counts - draws * expected) <= 5 * std + 1e-9), (counts, draws * expected)


def test_draws_are_a_function_of_seed_and_index():
    make = lambda seed: rare_class_sampling.rare_class_dataset(range(6), PIXELS, _Rcs, seed)
    first, again, other = make(1), make(1), make(2)
    # The pair's class is the drawn class: the image qualifies for it.
    assert all(PIXELS[first[k][0], first[k][1]] > MIN_PIXELS for k in range(200))
    sequence = [first[k] for k in range(200)]
    assert [again[k] for k in range(200)] == sequence
    assert [again[k] for k in range(150, 200)] == sequence[150:]  # Any index, any order.
    assert [other[k] for k in range(200)] != sequence


def test_a_class_without_qualifying_image_is_a_one_line_error():
    with pytest.raises(ValueError, match="min_pixels") as error:
        rare_class_sampling.images_per_class(PIXELS, np.asarray([1]), 100)
    assert "\n" not in str(error.value)


def _source_records():
    """Five source records; record i has 10 * i pixels of class 1 (record 0 none)."""
    out = []
    for i in range(5):
        label = np.full((32, 64), 3, np.uint8)
        label.reshape(-1)[: 10 * i] = 1
        label[0, -1] = 255
        image = np.full((32, 64, 3), i + 1, np.uint8)
        out.append(records.encode_example({"image": image, "label": label, "name": f"s{i}"}))
    return out


SOURCE = _source_records()


def test_class_pixel_counts_of_records():
    counts = rare_class_sampling.class_pixel_counts(SOURCE, 19)
    assert counts.shape == (5, 19)
    np.testing.assert_array_equal(counts[:, 1], [0, 10, 20, 30, 40])
    np.testing.assert_array_equal(counts[:, 3], 32 * 64 - 1 - counts[:, 1])
    assert counts.sum() == 5 * (32 * 64 - 1)  # The 255 pixel is not counted.


def test_statistics_are_written_once_and_a_corrupt_file_is_one_line(tmp_path):
    pixels = rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19)
    path = tmp_path / rare_class_sampling.STATS_FILE
    assert json.loads(path.read_text())["pixels"] == pixels.tolist()
    stored = np.zeros_like(pixels)
    stored[:, 0] = 7
    path.write_text(json.dumps({"pixels": stored.tolist()}))  # Read back, not recomputed.
    np.testing.assert_array_equal(
        rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19), stored
    )
    for bad in ("{not json", json.dumps({"pixels": [[1, 2]]}), json.dumps({"other": 1})):
        path.write_text(bad)
        with pytest.raises(ValueError, match="delete the file") as error:
            rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19)
        assert "\n" not in str(error.value)


def test_statistics_file_is_readable_by_all_and_never_half_written(tmp_path, monkeypatch):
    """Other users of a shared data_dir can read it; a failed write leaves nothing; a
    file that cannot be read (here a folder of its name) is not called corrupt."""
    rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19)
    path = tmp_path / rare_class_sampling.STATS_FILE
    assert path.stat().st_mode & 0o777 == 0o644
    path.unlink()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rare_class_sampling.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19)
    assert os.listdir(tmp_path) == []
    path.mkdir()
    with pytest.raises(ValueError, match="cannot read rare class sampling statistics") as error:
        rare_class_sampling.load_or_compute(str(tmp_path), SOURCE, 19)
    assert "corrupt" not in str(error.value)


def _rcs_config(seed=0):
    config = pipeline_config(seed=seed)
    config.data.rare_class_sampling.enabled = True
    config.data.rare_class_sampling.temperature = 0.01
    config.data.rare_class_sampling.min_pixels = 15
    return config


def test_pipeline_draws_only_qualifying_images_and_resumes_exactly():
    """Class 1 (rare) qualifies in records 2-4, class 3 in all: with T = 0.01 nearly every
    draw is for class 1. A restored iterator state replays the next batches."""
    pixels = rare_class_sampling.class_pixel_counts(SOURCE, 19)
    config = _rcs_config()
    iterator = pipeline.make_train_iterator(config, SOURCE, TARGET, source_class_pixels=pixels)
    batches = take(iterator, 6)
    seen = np.concatenate([b["source"]["image"][:, 0, 0, 0] for b in batches]) - 1
    assert set(seen.tolist()) <= {2, 3, 4}, seen
    restarted = pipeline.make_train_iterator(config, SOURCE, TARGET, source_class_pixels=pixels)
    assert_batches_equal(take(restarted, 6), batches)
    resumed = pipeline.make_train_iterator(config, SOURCE, TARGET, source_class_pixels=pixels)
    resumed.set_state(json.dumps({"batches": 3, "batch_size": 2}).encode())
    assert_batches_equal(take(resumed, 3), batches[3:])


def test_pipeline_without_the_statistics_refuses():
    with pytest.raises(ValueError, match="class pixel counts"):
        pipeline.make_train_iterator(_rcs_config(), SOURCE, TARGET)


def _block_example(top=20, left=40, size=12):
    """A 32x64 decoded source example: class 3 everywhere, a size x size block of class 1."""
    label = np.full((32, 64), 3, np.uint8)
    label[top : top + size, left : left + size] = 1
    return {"image": np.zeros((32, 64, 3), np.uint8), "label": label}


def test_crop_is_redrawn_until_it_holds_the_class():
    """Against the rule written out: with the same generator, the kept crop is the first of
    at most 11 plain scale-and-crop draws that holds more than min_crop_pixels pixels of
    the drawn class, else the 11th. The re-draw raises the share of qualifying crops; with
    min_crop_pixels 0 the first draw is kept."""
    bound = 7
    crop = rare_class_sampling.RareClassCrop((0.75, 1.25), (16, 32), bound)
    plain = transforms.RandomScaleCrop((0.75, 1.25), (16, 32))
    example = _block_example()
    kept_ok = first_ok = redrawn = 0
    for seed in range(200):
        got = crop.random_map((example, 1), np.random.default_rng(seed))
        rng = np.random.default_rng(seed)
        draws = [plain.random_map(example, rng)]
        while np.count_nonzero(draws[-1]["label"] == 1) <= bound and len(draws) < 11:
            draws.append(plain.random_map(example, rng))
        np.testing.assert_array_equal(got["label"], draws[-1]["label"])
        kept_ok += np.count_nonzero(got["label"] == 1) > bound
        first_ok += np.count_nonzero(draws[0]["label"] == 1) > bound
        redrawn += len(draws) > 1
    assert redrawn > 50 and first_ok < 150 and kept_ok >= 195, (redrawn, first_ok, kept_ok)
    first_only = rare_class_sampling.RareClassCrop((0.75, 1.25), (16, 32), 0)
    for seed in range(20):
        got = first_only.random_map((example, 1), np.random.default_rng(seed))
        first = plain.random_map(example, np.random.default_rng(seed))
        np.testing.assert_array_equal(got["label"], first["label"])


def test_pipeline_crops_hold_the_rare_class():
    """Through the train pipeline: nearly every draw is for the rare class 1 (T = 0.01);
    each source crop holds more than min_crop_pixels of it, which most plain crops do not
    (min_crop_pixels 0); and a resumed iterator replays the same crops."""
    source = [
        records.encode_example({**_block_example(top=4 * i, left=8 * i), "name": f"s{i}"})
        for i in range(5)
    ]
    pixels = rare_class_sampling.class_pixel_counts(source, 19)

    def crops(min_crop_pixels, skip=0):
        config = _rcs_config()
        config.data.crop_size, config.data.scale_range = (16, 32), (1.0, 1.0)
        config.data.rare_class_sampling.min_crop_pixels = min_crop_pixels
        iterator = pipeline.make_train_iterator(config, source, TARGET, source_class_pixels=pixels)
        iterator.set_state(json.dumps({"batches": skip, "batch_size": 2}).encode())
        batches = take(iterator, 8 - skip)
        return np.concatenate([(b["source"]["label"] == 1).sum(axis=(1, 2)) for b in batches])

    with_rule = crops(7)
    assert np.all(with_rule > 7), with_rule
    assert np.mean(crops(0) > 7) < 0.75
    np.testing.assert_array_equal(crops(7, skip=5), with_rule[10:])
