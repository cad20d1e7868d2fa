"""The saved-activations tool: what a gradient keeps from its forward pass, and where."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from wsda_jax import config_presets
from wsda_jax.tools.benchmarks import saved_activations


def test_residuals_of_known_gradients():
    """d sin(x) keeps cos(x); a Flax module's residuals carry its module path, with the
    blocks of a stage merged; a parameter kept as is is an argument."""
    x = jnp.ones((4, 8), jnp.float32)
    [row] = saved_activations.residuals(jnp.sin, x)
    assert (row.what, row.count, row.nbytes) == ("cos", 1, x.nbytes)

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(8)(x))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = Block(name=f"block1_{i}")(x)
            return x

    variables = Net().init(jax.random.key(0), x)
    rows = saved_activations.residuals(lambda v: jnp.sum(Net().apply(v, x)), variables)
    by_place = {(row.where, row.what): row for row in rows}
    # Each tanh's derivative needs its output: one [4, 8] float32 map per block.
    assert by_place[("block1_*", "tanh")].count == 2
    assert by_place[("block1_*", "tanh")].nbytes == 2 * x.nbytes
    assert ("(inputs)", "argument") in by_place  # The second kernel, for the first's grad.


@pytest.mark.extended
def test_daformer_step_keeps_no_depthwise_taps():
    """On the tiny synthetic DAFormer step, the residuals are placed in the model's
    modules, and no depthwise convolution (the MiT's Mix-FFN, the decoder's ASPP) keeps
    its taps: the backward pass recomputes them."""
    config = config_presets.synthetic(stage="adapt", weak_label="coarse", arg="daformer,tiny")
    rows = saved_activations.saved_activations(config)
    places = {row.where for row in rows}
    assert any(place.startswith("head/aspp_") for place in places)
    assert any(place.startswith("backbone/block1_*/") for place in places)
    # Without the recomputation: 27 shifted taps (3 passes x 9) in each of these places.
    assert not [r for r in rows if r.where.endswith(("/dwconv", "/depthwise/conv"))]
