"""1 device vs 4 devices: the same global batch must give the same losses and updates.

Runs in a subprocess with 4 host CPU devices (set before JAX initialises). The
stochastic parts are switched off (no ClassMix, no strong augmentation, zero weight on
the Gumbel boundary loss and the sampled contrastive losses), and every device's shard
has the same number of valid pixels, so the pmean of per-device means equals the
global mean. An N-times-too-large gradient (pmean-ing gradients that shard_map already
summed) changes the parameter updates 4x and fails the comparison.

A second run switches ClassMix, strong augmentation, the boundary loss and the sampled
contrastive losses on. Their draws are per device, as the reference's DDP: each device
mixes its own shard with its own key (`fold_in(key, device index)`) and samples its own
anchors with its own budget (`max_samples` per device). The test checks exactly that
(4 devices = each shard alone with its device's key), and that everything before the
draws (seg_s, seg_u, im_u, im_proto, the pseudo-label fraction, the prototypes) still
matches 1 device.
"""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import subprocesses

# A fresh process is the point here (see pyproject's `slow` marker).
pytestmark = pytest.mark.slow

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
config.data.jitter = 0.0  # The step's colour jitter draws per device, like ClassMix.
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
        steps.adapt_step, mesh, model=model, optimizer=optimizer, config=config,
        contrast_on=True)
    state = parallel.replicate(host_state, mesh)
    totals = []
    for batch in batches:
        state, metrics = step(state, parallel.put_batch(batch, mesh))
        totals.append({k: float(v) for k, v in metrics.items()})
        if n == 1 and len(totals) == 1:  # What precedes the draws, for the stochastic run.
            result["first_step"] = {
                "metrics": totals[0],
                "prototypes": [np.asarray(state.source_prototypes).tolist(),
                               np.asarray(state.target_prototypes).tolist()],
            }
    eval_fn = parallel.shard_eval_step(evaluation.eval_step, mesh, model=model, num_classes=5)
    confusion = eval_fn(state.student_variables(), parallel.put_batch(eval_batch, mesh))
    result[n] = {
        "metrics": totals,
        "params": [np.asarray(x).tolist() for x in jax.tree.leaves(state.params)],
        "batch_stats": [np.asarray(x).tolist() for x in jax.tree.leaves(state.batch_stats)],
        "prototypes": np.asarray(state.target_prototypes).tolist(),
        "confusion": np.asarray(confusion).tolist(),
    }

# ClassMix, strong augmentation, boundary and sampled contrastive losses on.
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
from wsda_jax import augment, contrastive, step_inputs
from wsda_jax.models import deeplab
stochastic = tiny_config("point", batch_size=4)
stochastic.loss.intra_max_samples = stochastic.loss.inter_max_samples = 64
# The colour jitter comes before every loss and draws per device (from step_key, checked
# below), so it is off here: then the losses before the later draws compare exactly.
stochastic.data.jitter = 0.0
mesh = parallel.make_mesh(jax.devices()[:4])
step = parallel.shard_train_step(
    steps.adapt_step, mesh, model=model, optimizer=optimizer, config=stochastic,
    contrast_on=True)
state, metrics = step(parallel.replicate(host_state, mesh), parallel.put_batch(batches[0], mesh))
result["stochastic"] = {
    "metrics": {k: float(v) for k, v in metrics.items()},
    "prototypes": [np.asarray(state.source_prototypes).tolist(),
                   np.asarray(state.target_prototypes).tolist()],
}

# The step's own key on device i is fold_in(fold_in(rng, step), i).
raw = lambda k: jax.random.key_data(k) if jnp.issubdtype(k.dtype, jax.dtypes.prng_key) else k
device_keys = jax.jit(jax.shard_map(
    lambda s: raw(step_inputs.step_key(s, "data"))[None], mesh=mesh, in_specs=P(),
    out_specs=P("data")))(parallel.replicate(host_state.replace(step=np.int32(3)), mesh))
step_3 = jax.random.fold_in(host_state.rng, 3)
expected_keys = [raw(jax.random.fold_in(step_3, i)) for i in range(4)]
result["device_keys_match"] = bool(np.array_equal(np.asarray(device_keys), np.stack(expected_keys)))
result["device_keys_differ"] = len({np.asarray(k).tobytes() for k in expected_keys}) == 4
key = jax.random.key(7)
rng = np.random.default_rng(0)
source, target = batches[0]["source"], batches[0]["target"]
mix_inputs = (
    augment.normalize(source["image"]), source["label"], augment.normalize(target["image"]),
    target["label"], rng.uniform(0, 1, target["label"].shape).astype(np.float32))

def mix(key, source_image, source_label, target_image, pseudo_label, weight):
    mixed = augment.mixed_batch(
        key, source_image, source_label, target_image, pseudo_label, weight, stochastic.classmix)
    return mixed.image, mixed.label, mixed.weight

def device_key(key):
    return jax.random.fold_in(key, jax.lax.axis_index("data"))

sharded_mix = jax.jit(jax.shard_map(
    lambda key, *xs: mix(device_key(key), *xs), mesh=mesh,
    in_specs=(P(),) + (P("data"),) * 5, out_specs=P("data")))
together = [np.asarray(x) for x in sharded_mix(key, *mix_inputs)]
mix_shard = lambda i: [x[i:i + 1] for x in mix_inputs]
alone = [[np.asarray(x) for x in jax.jit(mix)(jax.random.fold_in(key, i), *mix_shard(i))]
         for i in range(4)]
result["mix_max_diff"] = max(
    float(np.max(np.abs(together[k][i:i + 1] - alone[i][k]))) for i in range(4) for k in range(3))
result["mix_alone_differ"] = bool(np.any(alone[0][1] != alone[1][1]))

h = w = IMAGE_SIZE // 8
def out(seed):
    r = np.random.default_rng(seed)
    features = r.normal(size=(4, h, w, 16)).astype(np.float32)
    features /= np.linalg.norm(features, axis=-1, keepdims=True)
    return deeplab.SegmentationOutput(
        features=features, lowres_logits=(3 * r.normal(size=(4, h, w, 5))).astype(np.float32),
        logits=np.zeros((4, IMAGE_SIZE, IMAGE_SIZE, 5), np.float32))
out_s, out_u = out(1), out(2)
teacher = {"features": out(3).features,
           "masked_lowres": rng.integers(0, 5, (4, h, w)).astype(np.int32),
           "lowres_confidence": rng.uniform(0.5, 1, (4, h, w)).astype(np.float32)}
protos = rng.normal(size=(2, 5, 16)).astype(np.float32)
labels = (source["label"], target["weak_label"])

def contrast(key, out_s, out_u, source_label, weak_label, teacher):  # As adapt_step's keys.
    keys = dict(zip(("inter", "intra_src", "intra_tgt"), jax.random.split(key, 3)))
    losses_, counts = contrastive.contrastive_losses(
        keys, out_s, out_u, source_label, weak_label, teacher["features"],
        teacher["masked_lowres"], teacher["lowres_confidence"], protos[0], protos[1], stochastic)
    return (jnp.stack([losses_[k] for k in sorted(losses_)])[None],
            jnp.stack([counts[k] for k in sorted(counts)])[None])

sharded_contrast = jax.jit(jax.shard_map(
    lambda key, *xs: contrast(device_key(key), *xs), mesh=mesh,
    in_specs=(P(),) + (P("data"),) * 5, out_specs=P("data")))
args = (out_s, out_u, *labels, teacher)
loss4, count4 = (np.asarray(x) for x in sharded_contrast(key, *args))
shard = lambda i: jax.tree.map(lambda x: x[i:i + 1], args)
alone = [[np.asarray(x)[0] for x in jax.jit(contrast)(jax.random.fold_in(key, i), *shard(i))]
         for i in range(4)]
result["contrast"] = {"loss4": loss4.tolist(), "count4": count4.tolist(),
                      "loss_alone": [a[0].tolist() for a in alone],
                      "count_alone": [a[1].tolist() for a in alone]}
one = jax.jit(contrast)(key, *args)
result["contrast"]["count1"] = np.asarray(one[1])[0].tolist()
json.dump(result, sys.stdout)
"""


def _relative_error(a, b):
    a = np.concatenate([np.ravel(x) for x in a])
    b = np.concatenate([np.ravel(x) for x in b])
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-12))


def test_one_vs_four_devices_match():
    env = dict(os.environ)
    env["XLA_FLAGS"] = subprocesses.xla_flags(4)
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

    # Switched on, on 4 devices: what precedes the per-device draws still matches the first
    # step on 1 device with them off (the same state, batch and weights of those terms).
    one, four = result["first_step"], result["stochastic"]
    for name in ("seg_s", "seg_u", "im_u", "im_proto", "pseudo_confident_fraction"):
        np.testing.assert_allclose(four["metrics"][name], one["metrics"][name], rtol=1e-4)
    for name in ("seg_mix", "edge_s", "inter", "intra_src", "intra_tgt", "total"):
        assert np.isfinite(four["metrics"][name]), name
    assert _relative_error(four["prototypes"], one["prototypes"]) < 1e-4
    # The draws: device i draws with fold_in(step key, i), and 4 devices = each shard
    # alone with its device's key.
    assert result["device_keys_match"] and result["device_keys_differ"]
    assert result["mix_max_diff"] < 1e-5 and result["mix_alone_differ"]
    contrast = result["contrast"]
    np.testing.assert_allclose(contrast["loss4"], contrast["loss_alone"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(contrast["count4"], contrast["count_alone"])
    # Per-device budgets (max_samples each): never fewer anchors in all than on 1 device.
    assert np.sum(contrast["count4"]) >= np.sum(contrast["count1"]) > 0
