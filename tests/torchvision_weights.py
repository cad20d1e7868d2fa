"""Random torchvision ResNet state dicts (exact key names and shapes) for the ImageNet
initialisation tests: the output-stride-8 ResNet's block layout and its weights."""

import numpy as np

WIDTH = 8
STRIDES = (1, 2, 1, 1)
DILATIONS = (1, 1, 2, 4)


def block_specs(depth, stage_sizes, width):
    """torchvision's _make_layer bookkeeping: (prefix, planes, stride, dilation, downsample)."""
    expansion = 4 if depth >= 50 else 1
    inplanes = width
    specs = []
    for stage, num_blocks in enumerate(stage_sizes):
        planes = width * 2**stage
        for i in range(num_blocks):
            stride = STRIDES[stage] if i == 0 else 1
            downsample = stride != 1 or inplanes != planes * expansion
            specs.append((f"layer{stage + 1}.{i}", planes, stride, DILATIONS[stage], downsample))
            inplanes = planes * expansion
    return specs, expansion


def random_state_dict(depth, stage_sizes, seed=0):
    """Random weights under torchvision's exact key names and shapes (fc included)."""
    rng = np.random.default_rng(seed)
    sd = {}

    def conv(key, o, i, k):
        sd[key] = (rng.standard_normal((o, i, k, k)) * np.sqrt(2.0 / (i * k * k))).astype(
            np.float32
        )

    def bn(prefix, c):
        sd[prefix + ".weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[prefix + ".bias"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[prefix + ".running_mean"] = (0.1 * rng.standard_normal(c)).astype(np.float32)
        sd[prefix + ".running_var"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[prefix + ".num_batches_tracked"] = np.array(7, np.int64)

    conv("conv1.weight", WIDTH, 3, 7)
    bn("bn1", WIDTH)
    specs, expansion = block_specs(depth, stage_sizes, WIDTH)
    inplanes = WIDTH
    for prefix, planes, _, _, downsample in specs:
        if expansion == 1:
            conv(prefix + ".conv1.weight", planes, inplanes, 3)
            bn(prefix + ".bn1", planes)
            conv(prefix + ".conv2.weight", planes, planes, 3)
            bn(prefix + ".bn2", planes)
        else:
            conv(prefix + ".conv1.weight", planes, inplanes, 1)
            bn(prefix + ".bn1", planes)
            conv(prefix + ".conv2.weight", planes, planes, 3)
            bn(prefix + ".bn2", planes)
            conv(prefix + ".conv3.weight", planes * 4, planes, 1)
            bn(prefix + ".bn3", planes * 4)
        if downsample:
            conv(prefix + ".downsample.0.weight", planes * expansion, inplanes, 1)
            bn(prefix + ".downsample.1", planes * expansion)
        inplanes = planes * expansion
    sd["fc.weight"] = rng.standard_normal((10, inplanes)).astype(np.float32)
    sd["fc.bias"] = np.zeros(10, np.float32)
    return sd
