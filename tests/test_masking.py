"""Masked image consistency: the block mask, the masked batch, its loss, and the step's term."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model

from wsda_jax import augment, config_lib, masking, optim, parallel, steps, train_state


def _reference_mask(cells: np.ndarray, height: int, width: int) -> np.ndarray:
    """Nearest-neighbour upsampling written per pixel: pixel (y, x) of an H x W image
    covers the point ((y + 0.5) / H, (x + 0.5) / W) of the unit square, which lies in
    cell (floor(y * gh / H), floor(x * gw / W)) (torch's 'nearest')."""
    batch, grid_h, grid_w = cells.shape
    out = np.zeros((batch, height, width), bool)
    for y in range(height):
        for x in range(width):
            out[:, y, x] = cells[
                :, int(np.floor(y * grid_h / height)), int(np.floor(x * grid_w / width))
            ]
    return out


@pytest.mark.parametrize(
    "height, width, block, grid",
    [(96, 192, 12, (8, 16)), (512, 512, 64, (8, 8)), (32, 64, 4, (8, 16)), (40, 56, 16, (2, 4))],
)
def test_block_mask_grid_against_pixelwise_nearest(height, width, block, grid):
    """The grid is round(side / block) (MIC's) and each pixel takes its cell's draw."""
    key = jax.random.PRNGKey(3)
    assert masking.mask_grid_shape(height, width, block) == grid
    keep = np.asarray(masking.block_mask(key, 2, height, width, block, 0.7))
    cells = np.asarray(jax.random.uniform(key, (2, *grid))) > 0.7
    np.testing.assert_array_equal(keep, _reference_mask(cells, height, width))
    if height % grid[0] == 0 and width % grid[1] == 0:  # Exact blocks: a Kronecker product.
        blocks = np.kron(cells, np.ones((height // grid[0], width // grid[1]), bool))
        np.testing.assert_array_equal(keep, blocks)


def test_block_mask_ratio_within_binomial_tolerance():
    """The masked fraction of many independent blocks is mask_ratio +- 5 binomial stds."""
    ratio, batch, grid = 0.7, 64, (8, 16)
    keep = np.asarray(masking.block_mask(jax.random.PRNGKey(0), batch, 96, 192, 12, ratio))
    cells = keep[:, ::12, ::12]  # One pixel per 12-px block.
    assert cells.shape == (batch, *grid)
    n = cells.size
    masked = 1.0 - cells.mean()
    assert abs(masked - ratio) < 5 * np.sqrt(ratio * (1 - ratio) / n), masked
    assert abs((1.0 - keep.mean()) - masked) < 1e-9  # Equal blocks: same pixel fraction.


def _config(mask_ratio=0.5):
    config = config_lib.base_config()
    config.classmix.jitter_prob = 0.0
    config.classmix.blur_prob = 0.0
    config.mic.block_size = 4
    config.mic.mask_ratio = mask_ratio
    return config


def test_masked_batch_zeroes_masked_blocks_and_keeps_the_labels():
    """Without jitter and blur the image is the target where kept and 0 (the normalised
    mean colour) where masked; label and weight pass through."""
    rng = np.random.default_rng(0)
    target = augment.normalize(jnp.asarray(rng.integers(0, 256, (2, 16, 24, 3)), jnp.float32))
    label = jnp.asarray(rng.integers(0, 5, (2, 16, 24)), jnp.int32)
    weight = jnp.asarray(rng.random((2, 16, 24)), jnp.float32)
    masked_batch = jax.jit(lambda *args: masking.masked_batch(*args, _config()))
    out = masked_batch(jax.random.PRNGKey(1), target, label, weight)
    keep = np.asarray(out.keep)
    assert 0 < keep.mean() < 1
    expected = np.where(keep[..., None], np.asarray(target), 0.0)
    np.testing.assert_allclose(np.asarray(out.image), expected, atol=1e-5)
    np.testing.assert_array_equal(out.label, label)
    np.testing.assert_array_equal(out.weight, weight)


def test_mic_loss_matches_the_hand_written_formula():
    """The mic term is sum over valid pixels of w * (-log softmax at the pseudo label),
    divided by the number of valid (not 255) pixels."""
    logits = np.asarray([[[[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]], [[0.5, 0.5, 3.0], [1.0, 1.0, 1.0]]]])
    label = np.asarray([[[0, 1], [255, 2]]], np.int32)
    weight = np.asarray([[[0.5, 0.25], [1.0, 0.0]]], np.float32)

    def ce(row, c):
        return -(row[c] - np.log(np.exp(row).sum()))

    expected = (0.5 * ce(logits[0, 0, 0], 0) + 0.25 * ce(logits[0, 0, 1], 1) + 0.0) / 3
    masked = masking.MaskedBatch(
        image=jnp.zeros((1, 2, 2, 3)),
        label=jnp.asarray(label),
        weight=jnp.asarray(weight),
        keep=jnp.ones((1, 2, 2), bool),
    )
    got = masking.mic_loss(jnp.asarray(logits), masked)
    np.testing.assert_allclose(got, expected, rtol=1e-6)


def _run_step(config, batch):
    model = tiny_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    step = parallel.shard_train_step(
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config, contrast_on=True
    )
    _, metrics = step(
        parallel.replicate(jax.device_get(state), mesh), parallel.put_batch(batch, mesh)
    )
    return jax.device_get(metrics)


def test_step_adds_the_mic_term_and_keeps_the_other_streams():
    """With config.mic the step logs `mic` and adds it to the total; every other term is
    the reference's (MIC draws from streams of its own). `mic` is weighted by
    config.loss.mic through `steps.weighted_terms`, like every term."""
    batch = synthetic_batch(0, 2, "coarse")
    plain = _run_step(tiny_config("coarse"), batch)
    config = tiny_config("coarse")
    config.mic.enabled = True
    config.mic.block_size = 8
    config.loss.mic = 2.0
    with_mic = _run_step(config, batch)
    assert "mic" not in plain
    assert with_mic["mic"] > 0
    for name in plain:
        if name in ("total", "grad_norm"):
            continue
        np.testing.assert_allclose(with_mic[name], plain[name], rtol=1e-5, err_msg=name)
    np.testing.assert_allclose(with_mic["total"], plain["total"] + with_mic["mic"], rtol=1e-5)
    assert steps.weighted_terms({"mic": np.float32(1.5)}, config.loss) == {"mic": 3.0}


@pytest.mark.parametrize(
    "key, value", [("mic.mask_ratio", 1.5), ("mic.block_size", 0), ("loss.mic", -1.0)]
)
def test_bad_mic_settings_are_one_line_errors(key, value):
    config = config_lib.base_config()
    config.update_from_flattened_dict({key: value})
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        config_lib.validate(config, 1)
