"""torchvision state dict -> Flax backbone, checked against an independent NumPy ResNet."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from torchvision_weights import WIDTH, block_specs, random_state_dict

from wsda_jax.models import deeplab, imagenet_init, resnet

# ----- an independent NCHW NumPy ResNet, written from torchvision's definition -----


def conv2d(x, w, stride=1, padding=0, dilation=1):
    """torch.nn.functional.conv2d without bias: x (N,C,H,W), w (O,I,kh,kw)."""
    n, c, h, wd = x.shape
    o, i, kh, kw = w.shape
    assert i == c
    xp = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = np.zeros((n, o, ho, wo))
    for a in range(kh):
        for b in range(kw):
            patch = xp[
                :,
                :,
                a * dilation : a * dilation + stride * (ho - 1) + 1 : stride,
                b * dilation : b * dilation + stride * (wo - 1) + 1 : stride,
            ]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, a, b])
    return out


def batch_norm(x, sd, prefix):
    """Eval-mode torch BatchNorm2d (eps 1e-5)."""
    shape = (1, -1, 1, 1)
    mean = sd[prefix + ".running_mean"].reshape(shape)
    var = sd[prefix + ".running_var"].reshape(shape)
    scale = sd[prefix + ".weight"].reshape(shape)
    bias = sd[prefix + ".bias"].reshape(shape)
    return (x - mean) / np.sqrt(var + 1e-5) * scale + bias


def relu(x):
    return np.maximum(x, 0.0)


def max_pool_3x3_s2_p1(x):
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
    ho = (x.shape[2] + 2 - 3) // 2 + 1
    wo = (x.shape[3] + 2 - 3) // 2 + 1
    windows = [
        xp[:, :, a : a + 2 * (ho - 1) + 1 : 2, b : b + 2 * (wo - 1) + 1 : 2]
        for a in range(3)
        for b in range(3)
    ]
    return np.max(np.stack(windows), axis=0)


def numpy_resnet(sd, x, depth, stage_sizes):
    """Eval-mode forward of the output-stride-8 torchvision ResNet, NCHW float64."""
    x = conv2d(x, sd["conv1.weight"], stride=2, padding=3)
    x = max_pool_3x3_s2_p1(relu(batch_norm(x, sd, "bn1")))
    specs, expansion = block_specs(depth, stage_sizes, WIDTH)
    for prefix, _, stride, dil, downsample in specs:
        identity = x
        if expansion == 1:
            out = conv2d(x, sd[prefix + ".conv1.weight"], stride, dil, dil)
            out = relu(batch_norm(out, sd, prefix + ".bn1"))
            out = conv2d(out, sd[prefix + ".conv2.weight"], 1, dil, dil)
            out = batch_norm(out, sd, prefix + ".bn2")
        else:
            out = relu(batch_norm(conv2d(x, sd[prefix + ".conv1.weight"]), sd, prefix + ".bn1"))
            out = conv2d(out, sd[prefix + ".conv2.weight"], stride, dil, dil)
            out = relu(batch_norm(out, sd, prefix + ".bn2"))
            out = batch_norm(conv2d(out, sd[prefix + ".conv3.weight"]), sd, prefix + ".bn3")
        if downsample:
            identity = conv2d(x, sd[prefix + ".downsample.0.weight"], stride=stride)
            identity = batch_norm(identity, sd, prefix + ".downsample.1")
        x = relu(out + identity)
    return x


# ----- tests -----

CASES = {18: (1, 1, 1, 1), 50: (2, 1, 2, 1)}


@pytest.fixture(scope="module")
def setups():
    """Per depth: (model, init variables, random torchvision state dict)."""
    out = {}
    for depth, sizes in CASES.items():
        model = deeplab.DeepLabV2(
            num_classes=3, depth=depth, width=WIDTH, proj_dim=8, stage_sizes=sizes
        )
        # Shapes suffice for the conversion, and skip a slow random-init compile.
        variables = jax.eval_shape(
            lambda m=model: m.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)), train=False)
        )
        out[depth] = (model, variables, random_state_dict(depth, sizes, seed=depth))
    return out


@pytest.mark.parametrize("depth", sorted(CASES))
def test_backbone_matches_numpy_torchvision(setups, depth):
    model, variables, sd = setups[depth]
    converted = imagenet_init.convert_torchvision_resnet(sd, variables)
    # The head is untouched and the backbone replaced.
    assert converted["params"]["head"] is variables["params"]["head"]
    backbone = resnet.ResNet(depth=depth, width=WIDTH, stage_sizes=CASES[depth])
    x = np.random.default_rng(1).standard_normal((2, 30, 34, 3)).astype(np.float32)
    got = jax.jit(backbone.apply, static_argnames="train")(
        {
            "params": converted["params"]["backbone"],
            "batch_stats": converted["batch_stats"]["backbone"],
        },
        jnp.asarray(x),
        train=False,
    )
    want = numpy_resnet(sd, x.transpose(0, 3, 1, 2).astype(np.float64), depth, CASES[depth])
    want = want.transpose(0, 2, 3, 1)
    assert got.shape == want.shape == (2, 4, 5, WIDTH * 8 * (4 if depth == 50 else 1))
    rel = np.linalg.norm(np.asarray(got, np.float64) - want) / np.linalg.norm(want)
    assert rel < 1e-4, rel


def test_missing_key_is_named(setups):
    _, variables, sd = setups[50]
    sd = dict(sd)
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(ValueError, match=r"missing key 'layer3\.1\.bn2\.running_var'"):
        imagenet_init.convert_torchvision_resnet(sd, variables)


def test_misshaped_key_is_named(setups):
    _, variables, sd = setups[50]
    sd = dict(sd)
    sd["layer2.0.downsample.0.weight"] = np.zeros((64, 32, 3, 3), np.float32)
    with pytest.raises(ValueError, match=r"layer2\.0\.downsample\.0\.weight.*\(64, 32, 1, 1\)"):
        imagenet_init.convert_torchvision_resnet(sd, variables)


def test_unused_key_is_an_error(setups):
    _, variables, sd = setups[18]
    sd = {**sd, "layer4.1.conv1.weight": np.zeros((64, 64, 3, 3), np.float32)}
    with pytest.raises(ValueError, match=r"layer4\.1\.conv1\.weight"):
        imagenet_init.convert_torchvision_resnet(sd, variables)


def test_npz_round_trip_and_init_from_imagenet(setups, tmp_path):
    _, variables, sd = setups[18]
    path = str(tmp_path / "resnet.npz")
    np.savez(path, **sd)
    loaded = imagenet_init.load_state_dict(path)
    assert sorted(loaded) == sorted(sd)
    for key in sd:
        np.testing.assert_array_equal(loaded[key], sd[key])
    converted = imagenet_init.init_from_imagenet(variables, path)
    np.testing.assert_array_equal(
        converted["params"]["backbone"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        converted["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]["var"],
        sd["layer2.0.downsample.1.running_var"],
    )


def test_bad_path_suffix(tmp_path):
    with pytest.raises(ValueError, match="path="):
        imagenet_init.load_state_dict(str(tmp_path / "weights.bin"))
