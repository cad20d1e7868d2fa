"""Before loss.contrast_start the contrastive and image-level losses are not computed."""

import jax
import numpy as np
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model

from wsda_jax import optim, parallel, steps, train, train_state

jax.config.update("jax_disable_most_optimizations", True)  # Faster compiles of the tiny nets.

SWITCHED = ("im_u", "im_proto", "inter", "intra_src", "intra_tgt")


def test_terms_off_before_contrast_start_and_on_from_it():
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

    train_step = train.make_train_step(config, model, optimizer, mesh)
    history = []
    for step in range(4):
        state, step_metrics = train_step(state, batch, step)
        history.append(jax.device_get(step_metrics))
    for step, step_metrics in enumerate(history):
        assert np.isfinite(step_metrics["total"]), step
        for name in (*SWITCHED, "anchors_inter"):
            if step < 2:
                assert step_metrics[name] == 0.0, (step, name)
            elif name != "intra_tgt":  # Can sample no anchor on this tiny batch.
                assert step_metrics[name] != 0.0, (step, name)
    # The total is the sum of the terms that ran: nothing hidden was multiplied by 0.
    expected = sum(history[0][name] for name in ("seg_u", "seg_s", "edge_s", "seg_mix"))
    np.testing.assert_allclose(history[0]["total"], expected, rtol=1e-6)
    assert int(state.step) == 4 and int(state.skipped_steps) == 0
