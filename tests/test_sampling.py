"""Tests of wsda_jax.sampling.sample_anchors (under jax.jit)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wsda_jax import sampling

C = 4
MAX_VIEWS = 4
THRESHOLD = 0.9
HARD, EASY, UNSURE = "hard", "easy", "unsure"


@functools.cache
def _sampler(max_samples):
    return jax.jit(
        functools.partial(
            sampling.sample_anchors,
            num_classes=C,
            max_views=MAX_VIEWS,
            max_samples=max_samples,
            easy_threshold=THRESHOLD,
        )
    )


def _scene(spec, batch=1, size=8):
    """Label/pred/prob maps from {(image, class): {kind: count}}, pixels filled in raster order.

    hard: pred = another class; easy: pred = class, prob 0.95; unsure: pred = class, prob 0.5.
    """
    label = np.full((batch, size * size), 255, np.int32)
    pred = np.zeros((batch, size * size), np.int32)
    prob = np.ones((batch, size * size), np.float32)
    kinds = {}
    nxt = [0] * batch
    for (b, c), counts in spec.items():
        for kind, count in counts.items():
            for _ in range(count):
                p = nxt[b]
                nxt[b] += 1
                label[b, p] = c
                pred[b, p] = (c + 1) % C if kind == HARD else c
                prob[b, p] = 0.5 if kind == UNSURE else 0.95
                kinds[b * size * size + p] = kind
    shape = (batch, size, size)
    return label.reshape(shape), pred.reshape(shape), prob.reshape(shape), kinds


def _chosen(sample):
    """{(image, class): [kinds of the valid slots]} and checks that slots are consistent."""
    index = np.asarray(sample.index).reshape(-1, C, MAX_VIEWS)
    valid = np.asarray(sample.valid).reshape(-1, C, MAX_VIEWS)
    label = np.asarray(sample.label).reshape(-1, C, MAX_VIEWS)
    np.testing.assert_array_equal(label, np.broadcast_to(np.arange(C)[None, :, None], label.shape))
    out = {}
    for b in range(index.shape[0]):
        for c in range(C):
            # Valid slots are a prefix of the pair's slots.
            n = int(valid[b, c].sum())
            assert valid[b, c, :n].all()
            picked = index[b, c, :n]
            assert len(set(picked.tolist())) == n
            out[(b, c)] = picked.tolist()
    return out


def test_hard_before_easy_and_eligibility():
    spec = {
        (0, 0): {HARD: 2, EASY: 5, UNSURE: 3},  # 10 pixels: 2 hard + 2 easy
        (0, 1): {HARD: 5},  # 5 = max_views + 1: eligible, 4 of the hard ones
        (0, 2): {HARD: 4},  # exactly max_views: not eligible
        (0, 3): {HARD: 1, EASY: 1, UNSURE: 4},  # eligible, 2 candidates < n_view: nothing
    }
    label, pred, prob, kinds = _scene(spec)
    # total_eligible = 3, n_view = min(12 // 3, 4) = 4.
    sample = _sampler(12)(jax.random.key(0), label, pred, prob)
    chosen = _chosen(sample)
    flat_label = label.reshape(-1)
    for (_, c), picked in chosen.items():
        assert np.all(flat_label[picked] == c)
    assert sorted(kinds[p] for p in chosen[(0, 0)]) == [EASY, EASY, HARD, HARD]
    assert [kinds[p] for p in chosen[(0, 1)]] == [HARD] * 4
    assert chosen[(0, 2)] == [] and chosen[(0, 3)] == []
    # Within the pair, the hard ones come first.
    assert [kinds[p] for p in chosen[(0, 0)]][:2] == [HARD, HARD]


@pytest.mark.parametrize("max_samples,expected_view", [(12, 4), (9, 3), (5, 1), (2, 0)])
def test_n_view_follows_the_batch_rule(max_samples, expected_view):
    # Over the batch: 3 eligible pairs; (1, 1) has exactly max_views pixels.
    spec = {
        (0, 0): {HARD: 6},
        (0, 1): {EASY: 7},
        (1, 0): {HARD: 2, EASY: 8},
        (1, 1): {HARD: 4},
    }
    label, pred, prob, _ = _scene(spec, batch=2)
    chosen = _chosen(_sampler(max_samples)(jax.random.key(1), label, pred, prob))
    sizes = {pair: len(picked) for pair, picked in chosen.items() if picked}
    if expected_view == 0:
        assert sizes == {}
    else:
        assert sizes == {(0, 0): expected_view, (0, 1): expected_view, (1, 0): expected_view}


def test_views_per_pair_without_eligible_pairs_is_zero():
    assert int(sampling.views_per_pair(jnp.zeros((2, 3), bool), max_views=4, max_samples=8)) == 0
    eligible = jnp.array([[True, False], [True, True]])
    assert int(sampling.views_per_pair(eligible, max_views=20, max_samples=256)) == 20
    assert int(sampling.views_per_pair(eligible, max_views=20, max_samples=30)) == 10


def test_nothing_eligible_gives_no_valid_slot():
    label, pred, prob, _ = _scene({(0, 0): {HARD: 4}, (0, 1): {EASY: 3}})
    sample = _sampler(12)(jax.random.key(2), label, pred, prob)
    assert sample.index.shape == (C * MAX_VIEWS,)
    assert not np.any(sample.valid)
    all_ignore = np.full_like(label, 255)
    assert not np.any(_sampler(12)(jax.random.key(2), all_ignore, pred, prob).valid)


def _frequencies(label, pred, prob, pair, num_keys):
    keys = jax.random.split(jax.random.key(3), num_keys)
    sampler = _sampler(MAX_VIEWS)  # one eligible pair -> n_view = MAX_VIEWS
    index = jax.jit(jax.vmap(lambda k: sampler(k, label, pred, prob).index))(keys)
    valid = jax.jit(jax.vmap(lambda k: sampler(k, label, pred, prob).valid))(keys)
    index = np.asarray(index).reshape(num_keys, C, MAX_VIEWS)[:, pair[1]]
    valid = np.asarray(valid).reshape(num_keys, C, MAX_VIEWS)[:, pair[1]]
    assert valid.all()
    return np.bincount(index.ravel(), minlength=label.size)


def test_choice_among_hard_candidates_is_uniform():
    label, pred, prob, kinds = _scene({(0, 2): {HARD: 10, EASY: 3}})
    num_keys = 2000
    counts = _frequencies(label, pred, prob, (0, 2), num_keys)
    hard = [p for p, k in kinds.items() if k == HARD]
    assert counts.sum() == counts[hard].sum() == num_keys * MAX_VIEWS
    expected = num_keys * MAX_VIEWS / len(hard)
    chi2 = np.sum((counts[hard] - expected) ** 2 / expected)
    assert chi2 < 30.0, chi2  # 9 degrees of freedom: p < 0.001 for a uniform choice


def test_easy_fill_is_uniform_and_takes_every_hard_pixel():
    label, pred, prob, kinds = _scene({(0, 1): {HARD: 2, EASY: 8, UNSURE: 5}})
    num_keys = 2000
    counts = _frequencies(label, pred, prob, (0, 1), num_keys)
    hard = [p for p, k in kinds.items() if k == HARD]
    easy = [p for p, k in kinds.items() if k == EASY]
    unsure = [p for p, k in kinds.items() if k == UNSURE]
    assert np.all(counts[hard] == num_keys) and not np.any(counts[unsure])
    expected = num_keys * (MAX_VIEWS - len(hard)) / len(easy)
    chi2 = np.sum((counts[easy] - expected) ** 2 / expected)
    assert chi2 < 30.0, chi2  # 7 degrees of freedom


def test_same_key_same_sample_and_bad_inputs_raise():
    label, pred, prob, _ = _scene({(0, 0): {HARD: 9, EASY: 9}})
    a = _sampler(12)(jax.random.key(4), label, pred, prob)
    b = _sampler(12)(jax.random.key(4), label, pred, prob)
    np.testing.assert_array_equal(a.index, b.index)
    with pytest.raises(ValueError, match="pred"):
        sampling.sample_anchors(
            jax.random.key(0), label, pred[:, :4], prob, num_classes=C, max_views=MAX_VIEWS
        )
    with pytest.raises(ValueError, match="label"):
        sampling.sample_anchors(
            jax.random.key(0), label[0], pred[0], prob[0], num_classes=C, max_views=MAX_VIEWS
        )
    with pytest.raises(ValueError, match="max_views"):
        sampling.sample_anchors(jax.random.key(0), label, pred, prob, num_classes=C, max_views=65)
    with pytest.raises(ValueError, match="label has values"):
        sampling.sample_anchors(
            jax.random.key(0), np.full_like(label, 7), pred, prob, num_classes=C, max_views=4
        )
