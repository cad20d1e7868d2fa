"""Evaluation decodes the validation set once for the student and the teacher."""

import jax
import numpy as np
from conftest import IMAGE_SIZE, NUM_CLASSES, CountingRecords, tiny_config, tiny_model

from wsda_jax import evaluation, parallel, train, train_state
from wsda_jax.data import eval_pipeline, records


def test_one_decode_pass_evaluates_student_and_teacher(tmp_path):
    config = tiny_config("coarse")
    config.eval.per_device_batch_size = 2
    config.eval.num_panels = 1
    rng = np.random.default_rng(0)
    shape = (IMAGE_SIZE, IMAGE_SIZE)
    val = CountingRecords(
        [
            records.encode_example(
                {
                    "image": rng.integers(0, 256, (*shape, 3), np.uint8),
                    "label": rng.integers(0, NUM_CLASSES, shape).astype(np.uint8),
                }
            )
            for _ in range(5)
        ]
    )
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_state.create_train_state(
        config, tiny_model(config), jax.random.PRNGKey(0), (1, *shape, 3)
    )
    # A teacher that predicts differently from the student.
    state = state.replace(teacher_params=jax.tree.map(lambda x: -x, state.params))
    state = parallel.replicate(jax.device_get(state), mesh)
    model = tiny_model(config, bn_axis_name=None)
    eval_fn = evaluation.make_eval_fn(config, model, mesh)
    report = train.evaluate_and_report(
        config, str(tmp_path), 0, state, val, model=model, mesh=mesh, eval_fn=eval_fn
    )
    # 5 records in batches of 2 = 6 positions (one padding): one pass reads 6 records.
    assert val.reads == 6
    assert set(report) >= {"student", "teacher"}
    # Each model's confusion is the one it gets when evaluated alone.
    models = {"student": state.student_variables(), "teacher": state.teacher_variables()}
    together, _ = evaluation.evaluate(
        config, models, eval_pipeline.make_eval_iterator(config, val), model=model, mesh=mesh
    )
    for name, variables in models.items():
        alone, _ = evaluation.evaluate(
            config,
            {name: variables},
            eval_pipeline.make_eval_iterator(config, val),
            model=model,
            mesh=mesh,
            eval_fn=eval_fn,
        )
        np.testing.assert_array_equal(together[name], alone[name])
        assert together[name].sum() == 5 * IMAGE_SIZE * IMAGE_SIZE
        assert report[name]["pixels"] == 5 * IMAGE_SIZE * IMAGE_SIZE
    assert not np.array_equal(together["student"], together["teacher"])
