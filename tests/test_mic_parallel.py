"""Masked image consistency on 1 vs 4 devices: every device draws its own mask.

Runs in a subprocess with 4 host CPU devices. The step's MIC key (`step_inputs.mic_key`:
fold_in(fold_in(fold_in(rng, step), device), MIC_STREAM)) and `masking.masked_batch`
run inside shard_map, as in `adapt_step`. On 4 devices, shard d must equal its images
masked alone with device d's key, the 4 masks must differ, and on 1 device the whole
batch takes device 0's key.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import subprocesses

pytestmark = pytest.mark.slow  # A fresh process with 4 devices.

REPO = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = r"""
import functools, types
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from wsda_jax import config_lib, masking, parallel, step_inputs

assert jax.device_count() == 4
config = config_lib.base_config()
config.mic.block_size = 4
config.mic.mask_ratio = 0.7
rng = jax.random.PRNGKey(11)
step = jnp.int32(5)
images = jnp.asarray(np.random.default_rng(0).normal(size=(8, 16, 32, 3)), jnp.float32)
labels = jnp.zeros((8, 16, 32), jnp.int32)
weights = jnp.ones((8, 16, 32), jnp.float32)

def body(image, label, weight):
    state = types.SimpleNamespace(rng=rng, step=step)
    out = masking.masked_batch(step_inputs.mic_key(state, "data"), image, label, weight, config)
    return out.keep, out.image

def run(n):
    mesh = parallel.make_mesh(jax.devices()[:n])
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(P("data"),) * 3,
                               out_specs=(P("data"), P("data"))))
    return [np.asarray(x) for x in fn(images, labels, weights)]

@jax.jit
def _alone(device, image, label, weight):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(rng, step), device),
                             step_inputs.MIC_STREAM)
    out = masking.masked_batch(key, image, label, weight, config)
    return out.keep, out.image

def alone(device, rows):
    keep, image = _alone(device, images[rows], labels[rows], weights[rows])
    return np.asarray(keep), np.asarray(image)

keep4, image4 = run(4)
for d in range(4):
    keep, image = alone(d, slice(2 * d, 2 * d + 2))
    np.testing.assert_array_equal(keep4[2 * d: 2 * d + 2], keep)
    np.testing.assert_allclose(image4[2 * d: 2 * d + 2], image, atol=1e-4)
shards = [keep4[2 * d: 2 * d + 2] for d in range(4)]
assert all(not np.array_equal(shards[a], shards[b]) for a in range(4) for b in range(a)), "same"
keep1, _ = run(1)
np.testing.assert_array_equal(keep1, alone(0, slice(0, 8))[0])
print("OK")
"""


def test_mic_masks_are_drawn_per_device(tmp_path_factory):
    env = subprocesses.jax_env(tmp_path_factory.getbasetemp(), devices=4)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), str(REPO)])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().endswith("OK"), proc.stdout[-2000:]
