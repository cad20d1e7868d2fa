"""1 device vs 4 devices: the same global batch must give the same losses and updates.

Runs in a subprocess with 4 host CPU devices (set before JAX initialises). The
stochastic parts are switched off (no ClassMix, no strong augmentation, zero weight on
the Gumbel boundary loss and the sampled contrastive losses), and every device's shard
has the same number of valid pixels, so the pmean of per-device means equals the
global mean. An N-times-too-large gradient (pmean-ing gradients that shard_map already
summed) changes the parameter updates 4x and fails the comparison.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import json, sys
import jax
import numpy as np
jax.config.update("jax_disable_most_optimizations", True)
from conftest import IMAGE_SIZE, synthetic_batch, tiny_config, tiny_model
from wsda_jax import evaluation, optim, parallel, steps, train_state

assert jax.device_count() == 4, jax.devices()
config = tiny_config("point", batch_size=4)
config.classmix.enabled = False
config.classmix.jitter_prob = 0.0
config.classmix.blur_prob = 0.0
config.loss.edge_s = 0.0
config.loss.inter = config.loss.intra_src = config.loss.intra_tgt = 0.0
config.optim.lr = 0.05
model = tiny_model(config)
optimizer = optim.make_optimizer(config)
host_state = jax.device_get(train_state.create_train_state(
    config, model, jax.random.PRNGKey(0), (1, IMAGE_SIZE, IMAGE_SIZE, 3)))
batches = [synthetic_batch(seed, 4, "point") for seed in (0, 1)]
eval_batch = {"image": batches[1]["target"]["image"], "label": batches[1]["target"]["label"],
              "mask": np.asarray([True, True, True, False])}
result = {"params0": [np.asarray(x).tolist() for x in jax.tree.leaves(host_state.params)]}
for n in (1, 4):
    mesh = parallel.make_mesh(jax.devices()[:n])
    step = parallel.shard_train_step(
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config)
    state = parallel.replicate(host_state, mesh)
    totals = []
    for batch in batches:
        state, metrics = step(state, parallel.put_batch(batch, mesh))
        totals.append({k: float(v) for k, v in metrics.items()})
    eval_fn = parallel.shard_eval_step(evaluation.eval_step, mesh, model=model, num_classes=5)
    confusion = eval_fn(state.student_variables(), parallel.put_batch(eval_batch, mesh))
    result[n] = {
        "metrics": totals,
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
        "batch_stats": [np.asarray(x).tolist() for x in jax.tree.leaves(state.batch_stats)],
        "prototypes": np.asarray(state.target_prototypes).tolist(),
        "confusion": np.asarray(confusion).tolist(),
    }
json.dump(result, sys.stdout)
"""


def _relative_error(a, b):
    a = np.concatenate([np.ravel(x) for x in a])
    b = np.concatenate([np.ravel(x) for x in b])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_one_vs_four_devices_match():
    env = dict(os.environ)
    env["XLA_FLAGS"] = env.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout)
    one, four = result["1"], result["4"]
    for m1, m4 in zip(one["metrics"], four["metrics"], strict=True):
        for name in ("total", "seg_s", "seg_u", "seg_mix", "im_u", "im_proto", "grad_norm"):
            np.testing.assert_allclose(m4[name], m1[name], rtol=1e-4, err_msg=name)
        assert m1["pseudo_confident_fraction"] == m4["pseudo_confident_fraction"]
    # Compare the parameter *updates*: they are small next to the parameters themselves.
    params0 = [np.asarray(x) for x in result["params0"]]
    delta1 = [np.asarray(p) - p0 for p, p0 in zip(one["params"], params0, strict=True)]
    delta4 = [np.asarray(p) - p0 for p, p0 in zip(four["params"], params0, strict=True)]
    assert _relative_error(delta1, [np.zeros_like(d) for d in delta1]) > 0  # It trained.
    assert _relative_error(delta4, delta1) < 1e-4
    assert _relative_error(four["batch_stats"], one["batch_stats"]) < 1e-4
    assert _relative_error([four["prototypes"]], [one["prototypes"]]) < 1e-4
    np.testing.assert_array_equal(four["confusion"], one["confusion"])
    assert np.sum(one["confusion"]) == 3 * 32 * 32
