"""Our variables in the reference's (PyTorch) layout and names: what its checkpoints hold."""

import flax.traverse_util
import numpy as np

from wsda_jax.models import convert


def torch_layout(leaf: np.ndarray) -> np.ndarray:
    """One leaf in torch layout: HWIO -> OIHW; a Dense kernel (I, O) -> (O, I, 1, 1)."""
    if leaf.ndim == 4:
        return leaf.transpose(3, 2, 0, 1)
    if leaf.ndim == 2:
        return leaf.T[:, :, None, None]
    return leaf


def reference_state_dict(variables, prefix: str = "module.") -> dict[str, np.ndarray]:
    """Our variables under the reference's keys and layouts (DDP's `module.` prefix): the
    inverse of `convert`, written independently of it except for the key names."""
    out = {}
    for collection in ("params", "batch_stats"):
        for path, leaf in flax.traverse_util.flatten_dict(variables[collection]).items():
            key = prefix + convert.reference_key(collection, path)
            out[key] = torch_layout(np.asarray(leaf))
            if key.endswith("running_var"):
                out[key.replace("running_var", "num_batches_tracked")] = np.asarray(3)
    return out
