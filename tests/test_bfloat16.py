"""bfloat16 compute: a few adaptation steps track float32; float32 where it matters."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model

from wsda_jax import optim, parallel, steps, train_state
from wsda_jax.models import deeplab

NUM_STEPS = 4


def _run_steps(dtype: str, initial, batches):
    """`NUM_STEPS` adapt steps of the tiny model in `dtype` from `initial`; (state, metrics)."""
    config = tiny_config("coarse")
    config.compute_dtype = dtype
    model = tiny_model(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    step = parallel.shard_train_step(
        steps.adapt_step,
        mesh,
        model=model,
        optimizer=optim.make_optimizer(config),
        config=config,
        contrast_on=True,
    )
    state = parallel.replicate(initial, mesh)
    history = []
    for i in range(NUM_STEPS):
        state, step_metrics = step(state, parallel.put_batch(batches[i % 2], mesh))
        history.append(jax.device_get(step_metrics))
    return jax.device_get(state), history


@pytest.fixture(scope="module")
def float32_and_bfloat16():
    config = tiny_config("coarse")
    initial = jax.device_get(
        train_state.create_train_state(
            config, tiny_model(config), jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)
        )
    )
    batches = [synthetic_batch(seed, 2, "coarse") for seed in (0, 1)]
    return (
        initial,
        _run_steps("float32", initial, batches),
        _run_steps("bfloat16", initial, batches),
    )


def test_bfloat16_steps_track_float32(float32_and_bfloat16):
    initial, (state32, history32), (state16, history16) = float32_and_bfloat16
    for step, (m32, m16) in enumerate(zip(history32, history16, strict=True)):
        for name, value in m16.items():
            assert np.isfinite(value), (step, name)
        # Step 0 starts from the same parameters: only rounding differs. bfloat16 keeps 8
        # significant bits (relative rounding 2^-9 = 0.2%); over ~10 layers the dense
        # losses moved by <= 3e-4 and the total (which also holds the sampled contrastive
        # terms, whose anchors flip where a prediction crosses a threshold) by 3e-3.
        # Later steps add the divergence of the parameters themselves (lr 1e-2, head
        # 1e-1): measured up to 3% by step 3. A NaN, a float16-style overflow or a wrong
        # gradient is off by far more.
        rtol = 0.01 if step == 0 else 0.1
        for name in ("seg_s", "seg_u", "seg_mix", "total"):
            np.testing.assert_allclose(m16[name], m32[name], rtol=rtol, err_msg=f"{step} {name}")
    assert int(state16.skipped_steps) == 0
    # The parameters move like float32's. Measured: the projection kernel moved 0.55 in
    # float32 and ended 0.13 from it in bfloat16 (it is trained by the sampled contrastive
    # terms); a broken bfloat16 gradient would leave it ~0.55 (or more) away.
    kernel = lambda s: s.params["head"]["projection"]["kernel"]
    moved32 = np.linalg.norm(kernel(state32) - kernel(initial))
    apart = np.linalg.norm(kernel(state16) - kernel(state32))
    assert apart < 0.5 * moved32, (apart, moved32)


def test_bfloat16_state_stays_float32(float32_and_bfloat16):
    """Parameters, BatchNorm statistics, prototypes and the teacher are float32 state."""
    _, _, (state16, _) = float32_and_bfloat16
    for name in ("params", "batch_stats", "teacher_params", "teacher_batch_stats"):
        for path, leaf in jax.tree_util.tree_leaves_with_path(getattr(state16, name)):
            assert leaf.dtype == np.float32, (name, jax.tree_util.keystr(path))
    assert state16.source_prototypes.dtype == np.float32
    assert state16.target_prototypes.dtype == np.float32
    assert np.abs(state16.target_prototypes).sum() > 0


def test_classifier_branches_are_summed_in_float32():
    """Branch outputs 256 and 1 are exact in bfloat16, their sum 257 is not (it would
    round to 256): the head must add the branches in float32."""
    head = deeplab.Head(num_classes=1, proj_dim=2, aspp_dilations=(1, 2), dtype=jnp.bfloat16)
    x = jnp.ones((1, 4, 4, 3), jnp.float32)
    variables = jax.eval_shape(lambda: head.init(jax.random.key(0), x))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), variables)["params"]
    params["classifier_0"]["bias"] = jnp.full((1,), 256.0)
    params["classifier_1"]["bias"] = jnp.full((1,), 1.0)
    logits, _ = head.apply({"params": params}, x)
    assert logits.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(logits), 257.0)
