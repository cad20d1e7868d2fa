"""The saved-activations tool: what a gradient keeps from its forward pass, and where."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest

from wsda_jax import config_presets
from wsda_jax.tools.benchmarks import saved_activations


def test_residuals_of_known_gradients():
    """d sin(x) keeps cos(x), also inside a jitted call; residuals computed in a loop over
    Flax modules (as a MiT stage's blocks) carry the loop's module path and are stacked
    over its iterations; a rematerialised loop body keeps only its input; a parameter
    kept as is is an argument."""
    x = jnp.ones((4, 8), jnp.float32)
    [row] = saved_activations.residuals(jnp.sin, x)
    assert (row.what, row.count, row.nbytes) == ("cos", 1, x.nbytes)
    [row] = saved_activations.residuals(jax.jit(lambda x: jnp.sin(2 * x)), x)
    assert (row.what, row.count, row.nbytes) == ("cos", 1, x.nbytes)  # Traced into the jit.

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x):
            return jnp.tanh(nn.Dense(8, name="dense")(x))

    def step(layer, x, _):
        return layer(x), None

    class Net(nn.Module):
        layer_cls: type = Layer

        @nn.compact
        def __call__(self, x):
            x = nn.Dense(8, name="stem")(x)
            layers = nn.scan(step, variable_axes={"params": 0}, split_rngs={"params": True})
            return layers(self.layer_cls(name="layers"), x, jnp.arange(3))[0]

    def rows_of(net):
        variables = net.init(jax.random.key(0), x)
        rows = saved_activations.residuals(lambda v: jnp.sum(net.apply(v, x)), variables)
        return {(row.where, row.what): row for row in rows}

    by_place = rows_of(Net())
    # Each tanh's derivative needs its output: one [4, 8] float32 map per iteration.
    assert by_place[("layers", "tanh")].count == 1
    assert by_place[("layers", "tanh")].nbytes == 3 * x.nbytes
    assert ("(inputs)", "argument") in by_place  # The stem's input, for its kernel's grad.
    rematerialised = rows_of(Net(layer_cls=nn.remat(Layer)))
    assert ("layers", "tanh") not in rematerialised
    assert rematerialised[("layers/dense", "loop input")].nbytes == 3 * x.nbytes


@pytest.mark.extended
def test_daformer_step_keeps_no_depthwise_taps():
    """On the tiny synthetic DAFormer step, the residuals are placed in the model's
    modules, and no depthwise convolution (the MiT's Mix-FFN, the decoder's ASPP) keeps
    its taps: the backward pass recomputes them."""
    config = config_presets.synthetic(stage="adapt", weak_label="coarse", arg="daformer,tiny")
    rows = saved_activations.saved_activations(config)
    places = {row.where for row in rows}
    assert any(place.startswith("head/aspp_") for place in places)
    assert any(place.startswith("backbone/block1/") for place in places)
    # Without the recomputation: 27 shifted taps (3 passes x 9) in each of these places.
    assert not [r for r in rows if r.where.endswith(("/dwconv", "/depthwise/conv"))]
