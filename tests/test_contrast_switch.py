"""Before loss.contrast_start the contrastive and image-level losses are not computed.

Their values in the train loop (0 before, non-zero from contrast_start) are checked end
to end in tests/test_train.py."""

import jax
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model

from wsda_jax import optim, parallel, steps, train_state


def test_program_before_contrast_start_has_no_anchor_sampling():
    config = tiny_config("coarse")
    config.loss.contrast_start = 2
    model = tiny_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)
    )
    state = parallel.replicate(jax.device_get(state), mesh)
    batch = parallel.put_batch(synthetic_batch(0, 2, "coarse"), mesh)
    # The program before contrast_start has no anchor sampling (top_k) at all.
    jaxprs = {
        on: str(
            jax.make_jaxpr(
                parallel.shard_train_step(
                    steps.adapt_step,
                    mesh,
                    model=model,
                    optimizer=optimizer,
                    config=config,
                    contrast_on=on,
                )
            )(state, batch)
        )
        for on in (False, True)
    }
    assert "top_k" in jaxprs[True] and "top_k" not in jaxprs[False]
    assert len(jaxprs[False]) < len(jaxprs[True])


def test_both_programs_log_the_same_metrics():
    """The metrics the program before contrast_start does not compute read 0 there
    (`steps.contrast_off_metrics`), so both programs log the same keys."""
    config = tiny_config("coarse")
    model = tiny_model(config)
    optimizer = optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3), abstract=True
    )
    batch = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), synthetic_batch(0, 2, "coarse")
    )
    names = {}
    for on in (False, True):
        step = parallel.shard_train_step(
            steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config, contrast_on=on
        )
        names[on] = set(jax.eval_shape(step, state, batch)[1])
    assert names[False] == names[True]
    off = steps.contrast_off_metrics(config)
    assert set(off) == {"inter", "intra_src", "intra_tgt", "im_u", "im_proto"} | {
        "anchors_inter",
        "anchors_intra_src",
        "anchors_intra_tgt",
    }
    assert all(float(value) == 0.0 for value in off.values())
