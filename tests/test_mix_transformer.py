"""The MiT encoder: shapes, attention, remat, stochastic depth, and NVlabs weights checked
against an independent NumPy forward (tests/mit_weights.py)."""

import functools

import flax.linen
import flax.traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from mit_weights import numpy_mit, random_state_dict

from wsda_jax.models import imagenet_init
from wsda_jax.models import mix_transformer as mt

DIMS = (8, 16, 40, 64)  # Multiples of the heads (1, 2, 5, 8).
DEPTHS = (2, 1, 1, 1)
HEIGHT, WIDTH = 66, 98  # Non-square, not multiples of 32: ceil sizes and dropped remainders.


def tiny(**kwargs):
    return mt.MixTransformer(variant="b0", embed_dims=DIMS, depths=DEPTHS, **kwargs)


@functools.cache
def jitted(model):
    """`model.apply`, compiled once per model settings for the whole module."""
    return jax.jit(model.apply, static_argnames=("train",))


def images(batch=2, seed=0, height=HEIGHT, width=WIDTH):
    return np.random.default_rng(seed).normal(size=(batch, height, width, 3)).astype(np.float32)


@pytest.fixture(scope="module")
def weights():
    """(NVlabs state dict with the classifier keys, the converted variables)."""
    sd = random_state_dict(DIMS, DEPTHS, seed=1, classifier=True)
    return sd, mt.variables_from_state_dict(sd, "b0", embed_dims=DIMS, depths=DEPTHS)


def test_stage_shapes_and_strides(weights):
    x = images(2)
    shapes = jax.eval_shape(lambda: tiny().init(jax.random.PRNGKey(0), x, train=False))
    assert set(shapes) == {"params"}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    outputs = jitted(tiny())(weights[1], x, train=False)
    strides = (4, 8, 16, 32)
    expected = [(2, -(-HEIGHT // s), -(-WIDTH // s), d) for s, d in zip(strides, DIMS, strict=True)]
    assert [o.shape for o in outputs] == expected
    assert all(o.dtype == jnp.float32 for o in outputs)


def test_variants_and_bad_settings():
    assert mt.VARIANTS["b5"] == ((64, 128, 320, 512), (3, 6, 40, 3))
    shapes = jax.eval_shape(
        lambda x: mt.MixTransformer("b1").init(jax.random.PRNGKey(0), x, train=False),
        jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),
    )["params"]
    assert [k for k in shapes if k.startswith("block")] == [f"block{s}" for s in range(1, 5)]
    assert shapes["norm4"]["scale"].shape == (512,)
    assert shapes["block1"]["attn"]["sr"]["kernel"].shape == (2, 8, 8, 64, 64)
    assert shapes["block3"]["mlp"]["dwconv"]["kernel"].shape == (2, 3, 3, 1, 1280)
    assert "sr" not in shapes["block4"]["attn"]
    per_block = jax.eval_shape(mt.unstack_blocks, shapes)
    assert sorted(k for k in per_block if k.startswith("block3")) == ["block3_0", "block3_1"]
    assert per_block["block1_1"]["mlp"]["dwconv"]["kernel"].shape == (3, 3, 1, 256)
    with pytest.raises(ValueError, match=r"remat='conv_outputs': expected one of \('none'"):
        tiny(remat="conv_outputs").init(jax.random.PRNGKey(0), images(1), train=False)
    with pytest.raises(ValueError, match="variant='b9'"):
        mt.stage_settings("b9")
    with pytest.raises(ValueError, match="embed_dims"):
        mt.stage_settings("b0", embed_dims=(8, 16, 32, 64))  # 32 is not a multiple of 5.


def test_attention_equals_explicit_formula():
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(2, 12, 5, 8)), jnp.float32)
    k, v = (jnp.asarray(rng.normal(size=(2, 7, 5, 8)), jnp.float32) for _ in range(2))
    scores = np.einsum("btnd,bsnd->bnts", q, k) / np.sqrt(8)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    expected = np.einsum("bnts,bsnd->btnd", probs, v)
    np.testing.assert_allclose(mt.attention(q, k, v), expected, atol=2e-6)
    np.testing.assert_allclose(mt.explicit_attention(q, k, v), expected, atol=2e-6)


def test_matches_numpy_forward(weights):
    """Every stage of the converted weights equals the NumPy encoder on the NVlabs keys."""
    sd, variables = weights
    x = images(2, seed=3)
    expected = numpy_mit(sd, x, DEPTHS)
    with jax.enable_x64(True):
        params = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
        ours = jitted(tiny(dtype=jnp.float64))(params, jnp.asarray(x, jnp.float64), train=False)
        for stage, (a, b) in enumerate(zip(ours, expected, strict=True)):
            assert a.dtype == jnp.float64
            np.testing.assert_allclose(a, b, atol=1e-9, err_msg=f"stage {stage + 1}")
    ours32 = jitted(tiny())(variables, x, train=False)
    for a, b in zip(ours32, expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-3)


@pytest.mark.parametrize("swap", ["kv_halves", "q_proj"])
def test_a_misplaced_weight_is_caught(weights, swap):
    """The NumPy comparison fails if k and v, or q and proj, trade places."""
    sd, _ = weights
    bad = dict(sd)
    p = "block2.0.attn."
    if swap == "kv_halves":
        for leaf in ("weight", "bias"):
            k, v = np.split(sd[p + "kv." + leaf], 2)
            bad[p + "kv." + leaf] = np.concatenate([v, k])
    else:
        bad[p + "q.weight"], bad[p + "proj.weight"] = sd[p + "proj.weight"], sd[p + "q.weight"]
    variables = mt.variables_from_state_dict(bad, "b0", embed_dims=DIMS, depths=DEPTHS)
    x = images(2, seed=3)
    ours = jitted(tiny())(variables, x, train=False)
    expected = numpy_mit(sd, x, DEPTHS)
    assert np.abs(np.asarray(ours[1]) - expected[1]).max() > 1e-2


def test_state_dict_round_trip(weights):
    sd, variables = weights
    per_block = mt.unstack_blocks(variables["params"])
    restacked = mt.stack_blocks(per_block)
    for a, b in zip(*map(jax.tree.leaves, (restacked, variables["params"])), strict=True):
        np.testing.assert_array_equal(a, b)
    flat = flax.traverse_util.flatten_dict(per_block)
    back = {mt.torch_key(path): value for path, value in flat.items()}
    assert sorted(back) == sorted(set(sd) - {"head.weight", "head.bias"})
    for path, value in flat.items():
        key = mt.torch_key(path)
        assert value.dtype == np.float32
        assert mt.torch_shape(value.shape) == sd[key].shape
        np.testing.assert_array_equal(mt.to_flax(sd[key]), value)
    assert mt.torch_key(("block1_1", "mlp", "dwconv", "kernel")) == (
        "block1.1.mlp.dwconv.dwconv.weight"
    )
    np.testing.assert_array_equal(
        variables["params"]["block1"]["attn"]["kv"]["kernel"][1], sd["block1.1.attn.kv.weight"].T
    )


def test_strict_keys(weights):
    sd, _ = weights

    def convert(state_dict):
        return mt.variables_from_state_dict(state_dict, "b0", embed_dims=DIMS, depths=DEPTHS)

    missing = {k: v for k, v in sd.items() if not k.startswith("block1.1.")}
    with pytest.raises(ValueError, match=r"20 missing keys \(first: block1\.1\.attn\.kv\.bias, "):
        convert(missing)
    with pytest.raises(ValueError, match=r"1 keys the model does not use \(first: block9\.0\.x\)"):
        convert({**sd, "block9.0.x": np.zeros(1)})
    wrong = {**sd, "norm4.weight": np.ones(65, np.float32)}
    with pytest.raises(ValueError, match=r"wrong shape.*norm4\.weight \(65,\) != \(64,\)"):
        convert(wrong)
    with pytest.raises(ValueError, match="missing keys .*; .* keys of the wrong shape"):
        mt.variables_from_state_dict(sd, "b0")  # b0's own widths and depths.


def test_imagenet_npz_into_backbone(weights, tmp_path):
    """`init.imagenet` for arch='daformer': the MiT weights replace params['backbone'] only."""
    sd, variables = weights
    path = str(tmp_path / "mit.npz")
    np.savez(path, **sd)
    zeros = jax.tree.map(np.zeros_like, variables["params"])
    model_vars = {"params": {"backbone": zeros, "head": {"w": np.ones(2)}}, "batch_stats": {}}
    out = imagenet_init.init_from_imagenet(model_vars, path, arch="daformer")
    np.testing.assert_array_equal(out["params"]["head"]["w"], np.ones(2))
    leaves = jax.tree.leaves(out["params"]["backbone"]), jax.tree.leaves(variables)
    for a, b in zip(*leaves, strict=True):
        np.testing.assert_array_equal(a, b)
    del sd["norm2.bias"]
    np.savez(path, **sd)
    with pytest.raises(ValueError, match="1 missing keys .first: norm2.bias"):
        imagenet_init.init_from_imagenet(model_vars, path, arch="daformer")


def test_remat_same_outputs_and_gradients(weights):
    """Each stage is one loop over its blocks (a `scan` of length `depths[s]`); with
    remat='blocks' its body is one rematerialised call (`jax.checkpoint`) holding the
    block's matrix products (without remat only the depthwise convolutions are
    checkpointed calls). The outputs, and the gradients of a rematerialised block, are
    those of the plain one."""
    _, variables = weights
    x = images(2)
    plain = jitted(tiny())(variables, x, train=False)
    remat = jitted(tiny(remat="blocks"))(variables, x, train=False)
    for a, b in zip(plain, remat, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    def stage_loops(model):
        """(length, checkpointed calls of the body as text) of each top-level loop."""
        program = jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=False))
        loops = [e for e in program(variables["params"]).jaxpr.eqns if e.primitive.name == "scan"]
        return [
            (
                loop.params["length"],
                [
                    str(e.params["jaxpr"])
                    for e in loop.params["jaxpr"].eqns
                    if "remat" in str(e.primitive)
                ],
            )
            for loop in loops
        ]

    blocks = stage_loops(tiny(remat="blocks"))
    assert [length for length, _ in blocks] == list(DEPTHS)
    assert all(len(calls) == 1 and "dot_general" in calls[0] for _, calls in blocks)
    no_remat = stage_loops(tiny())
    assert [length for length, _ in no_remat] == list(DEPTHS)
    assert all(len(calls) == 1 and "dot_general" not in calls[0] for _, calls in no_remat)

    block_params = {"params": mt.unstack_blocks(variables["params"])["block1_1"]}
    y = jnp.asarray(np.random.default_rng(0).normal(size=(2, 17, 25, DIMS[0])), jnp.float32)

    def block_grads(block_cls):
        block = block_cls(mt.NUM_HEADS[0], mt.SR_RATIOS[0])
        loss = lambda p, y: jnp.sum(jnp.sin(block.apply(p, y)))
        return jax.jit(jax.grad(loss, argnums=(0, 1)))(block_params, y)

    grads = block_grads(mt.Block), block_grads(flax.linen.remat(mt.Block))
    for a, b in zip(*map(jax.tree.leaves, grads), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(a).max())


def test_drop_path_only_in_train(weights):
    _, variables = weights
    x = images(2)
    model = tiny(drop_path_rate=0.5)
    reference = jitted(tiny())(variables, x, train=False)[3]
    np.testing.assert_array_equal(jitted(model)(variables, x, train=False)[3], reference)

    def train(seed):
        rngs = {"dropout": jax.random.PRNGKey(seed)}
        return jitted(model)(variables, x, train=True, rngs=rngs)[3]

    np.testing.assert_array_equal(train(0), train(0))
    assert np.abs(train(0) - train(1)).max() > 1e-3
    assert np.abs(train(0) - reference).max() > 1e-3


def test_bfloat16_compute_float32_params(weights):
    model = tiny(dtype=jnp.bfloat16)
    x = images(2)
    shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), x, train=False))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(shapes))
    variables = weights[1]
    outputs = jitted(model)(variables, x, train=False)
    reference = jitted(tiny())(variables, x, train=False)
    for a, b in zip(outputs, reference, strict=True):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=0.15)


def test_unrolled_blocks_are_the_same_function_without_loops(weights):
    """unroll=True: the same outputs from the same parameters, and XLA's cost analysis
    then counts every block (it counts a loop's body once)."""
    _, variables = weights
    x = images(2)
    for a, b in zip(
        jitted(tiny())(variables, x, train=False),
        jitted(tiny(unroll=True))(variables, x, train=False),
        strict=True,
    ):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)

    def flops(model, params):
        lowered = jax.jit(lambda p: model.apply(p, x, train=False)).lower(params)
        return lowered.cost_analysis()["flops"]

    one_block = mt.MixTransformer(variant="b0", embed_dims=DIMS, depths=(1, 1, 1, 1))
    one_block_params = one_block.init(jax.random.PRNGKey(0), x, train=False)
    # Stage 1 has two blocks; looped, the analysis sees one, as in a model of one block.
    assert flops(tiny(), variables) == flops(one_block, one_block_params)
    assert flops(tiny(unroll=True), variables) > flops(tiny(), variables)
