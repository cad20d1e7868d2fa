"""ImageNet initialisation: a PyTorch state dict -> the Flax `backbone`.

No download at run time: the user supplies the weights as `.pth` (read with torch, if
it is installed, with `weights_only=True`: tensors only, no pickled code) or as an
`.npz` with the same keys. Per `config.model.arch`:

- 'deeplabv2': torchvision's `resnet101-*.pth` -> `params/backbone`, `batch_stats/backbone`;
- 'daformer': NVlabs' SegFormer `mit_b0.pth`..`mit_b5.pth` -> `params/backbone`
  (`mix_transformer.convert_state_dict`; its classifier `head.*` ignored).

Naming between the torchvision and Flax ResNet trees (see `resnet.py`):

    conv1.weight                   -> params/backbone/conv1/kernel   (OIHW -> HWIO)
    bn1.{weight,bias}              -> params/backbone/bn1/{scale,bias}
    bn1.{running_mean,running_var} -> batch_stats/backbone/bn1/{mean,var}
    layer3.4.conv2.weight          -> params/backbone/layer3_4/conv2/kernel
    layer3.0.downsample.{0,1}.*    -> .../layer3_0/{downsample_conv,downsample_bn}/...

`fc.*` and `*.num_batches_tracked` are ignored.
"""

from __future__ import annotations

import os
from typing import Any

import flax.traverse_util
import numpy as np

from wsda_jax.models import mix_transformer

IGNORED_SUFFIXES = ("num_batches_tracked",)
IGNORED_PREFIXES = ("fc.",)
_MODULE_NAMES = {"downsample_conv": "downsample.0", "downsample_bn": "downsample.1"}
_LEAF_NAMES = {
    ("params", "kernel"): "weight",
    ("params", "scale"): "weight",
    ("params", "bias"): "bias",
    ("batch_stats", "mean"): "running_mean",
    ("batch_stats", "var"): "running_var",
}
ARCHS = ("deeplabv2", "daformer")
_NPZ_HINT = (
    'convert it to .npz on a machine with torch: python -c "import numpy, torch; '
    "sd = torch.load('IN.pth', map_location='cpu', weights_only=True); "
    "numpy.savez('OUT.npz', **{k: v.numpy() for k, v in sd.items()})\""
)


def check_weights_path(path: str) -> str:
    """`path` with `~` expanded; a one-line ValueError (that does not repeat the path)
    unless it names an existing .npz or .pth file. What it holds is checked when read."""
    path = os.path.expanduser(path)
    if not path.endswith((".npz", ".pth", ".pt")):
        raise ValueError("expected a .npz or .pth file")
    if not os.path.isfile(path):
        raise ValueError("no such file")
    return path


def load_state_dict(path: str) -> dict[str, np.ndarray]:
    """Reads a state dict (key -> tensor) from `.npz` or `.pth` into NumPy arrays.

    Raises a one-line ValueError naming the file when it is missing or is not a weight
    file (not an archive of arrays / a torch pickle of tensors).
    """
    try:
        path = check_weights_path(path)
    except ValueError as e:
        raise ValueError(f"path={path!r}: {e}") from e
    try:
        return _read_weights(path)
    except ImportError as e:
        raise ValueError(
            f"path={path!r}: reading .pth needs torch, which is not installed; {_NPZ_HINT}"
        ) from e
    except Exception as e:  # noqa: BLE001 - NumPy/torch raise many kinds for garbage.
        # Not NumPy's own message: it advises allow_pickle, which is not the problem.
        kind = "an .npz archive of arrays" if path.endswith(".npz") else "a torch state dict"
        raise ValueError(
            f"path={path!r} is not a weight file: it cannot be read as {kind} (expected a "
            "torchvision ResNet or NVlabs MiT state dict)"
        ) from e


def _read_weights(path: str) -> dict[str, np.ndarray]:
    """The arrays of a .npz (no pickles) or a .pth file."""
    if path.endswith(".npz"):
        with np.load(path, allow_pickle=False) as data:
            return {key: np.asarray(data[key]) for key in data.files}
    import torch  # Optional: only needed for .pth files.

    loaded = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(loaded, dict):
        raise TypeError(f"it holds a {type(loaded).__name__}, not a state dict")
    if "state_dict" in loaded:
        loaded = loaded["state_dict"]
    return {key: value.detach().cpu().numpy() for key, value in loaded.items()}


def torch_key(collection: str, path: tuple[str, ...]) -> str:
    """Flax backbone path, e.g. ('layer1_0', 'conv1', 'kernel') -> 'layer1.0.conv1.weight'."""
    *modules, leaf = path
    names = []
    for module in modules:
        if module in _MODULE_NAMES:
            names.append(_MODULE_NAMES[module])
        else:
            names.append(module.replace("_", "."))  # layer3_4 -> layer3.4; conv1 unchanged.
    if (collection, leaf) not in _LEAF_NAMES:
        raise ValueError(f"variables: unexpected backbone leaf {collection}/{'/'.join(path)}")
    return ".".join(names + [_LEAF_NAMES[(collection, leaf)]])


def to_flax(value: np.ndarray, leaf: str) -> np.ndarray:
    """Torch layout -> Flax layout: conv OIHW -> HWIO, vectors unchanged; float32."""
    value = np.asarray(value, dtype=np.float32)
    return value.transpose(2, 3, 1, 0) if leaf == "kernel" else value


def torch_shape(shape: tuple[int, ...], leaf: str) -> tuple[int, ...]:
    """The torch shape that a Flax leaf of `shape` must come from."""
    if leaf == "kernel":
        h, w, i, o = shape
        return (o, i, h, w)
    return tuple(shape)


def convert_torchvision_resnet(
    state_dict: dict[str, np.ndarray], variables: dict[str, Any]
) -> dict[str, Any]:
    """Returns `variables` with `params/backbone` and `batch_stats/backbone` from torchvision.

    Args:
      state_dict: torchvision ResNet keys -> arrays (NCHW / OIHW layout).
      variables: the DeepLabV2 variables (`model.init(...)`, or its `jax.eval_shape`),
        used for structure, shapes and the untouched `head`.

    Returns:
      A new variables dict; the backbone leaves are float32 NumPy arrays.

    Raises:
      ValueError naming the first missing key, the first key whose shape differs
      (expected vs found), or keys of the state dict that the model does not use.
    """
    used = set()
    converted = {}
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(variables[collection]["backbone"])
        new_flat = {}
        for path, old in flat.items():
            key = torch_key(collection, path)
            if key not in state_dict:
                raise ValueError(f"state_dict: missing key {key!r}")
            value = np.asarray(state_dict[key])
            expected = torch_shape(tuple(old.shape), path[-1])
            if value.shape != expected:
                raise ValueError(
                    f"state_dict[{key!r}]: expected shape {expected}, found {value.shape}"
                )
            new_flat[path] = to_flax(value, path[-1])
            used.add(key)
        converted[collection] = flax.traverse_util.unflatten_dict(new_flat)
    unused = sorted(
        key
        for key in state_dict
        if key not in used
        and not key.startswith(IGNORED_PREFIXES)
        and not key.endswith(IGNORED_SUFFIXES)
    )
    if unused:
        raise ValueError(
            f"state_dict: {len(unused)} keys the model does not use (wrong depth or "
            f"stage_sizes?), first {unused[0]!r}"
        )
    out = dict(variables)
    for collection in ("params", "batch_stats"):
        out[collection] = {**variables[collection], "backbone": converted[collection]}
    return out


def init_from_imagenet(
    variables: dict[str, Any], path: str, arch: str = "deeplabv2"
) -> dict[str, Any]:
    """`variables` with the backbone read from the ImageNet weights at `path`.

    arch: 'deeplabv2' (torchvision ResNet: params and batch_stats) or 'daformer'
    (NVlabs MiT: params only, checked against the shapes of `params/backbone`).
    Raises a one-line ValueError for a bad file or a state dict of another network.
    """
    if arch not in ARCHS:
        raise ValueError(f"arch={arch!r}: expected one of {ARCHS}")
    state_dict = load_state_dict(path)
    if arch == "deeplabv2":
        return convert_torchvision_resnet(state_dict, variables)
    backbone = mix_transformer.convert_state_dict(state_dict, variables["params"]["backbone"])
    return {**variables, "params": {**variables["params"], "backbone": backbone}}
