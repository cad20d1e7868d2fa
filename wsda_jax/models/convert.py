"""The reference's DeepV2R101 checkpoints (anurag-198/WDASS) and released DAFormer / MIC
checkpoints (lhoyer/DAFormer, lhoyer/MIC) -> an Orbax checkpoint of ours.

    python -m wsda_jax.models.convert --checkpoint=wdass.pth \
        --config=configs/gta2cs_coarse.py --out=DIR

writes `DIR/checkpoints/0/` in the layout `train.py` writes, so that `--mode=eval`,
`--mode=predict` (`--workdir=DIR`) and `config.init.init_from=DIR` read it. The
reference saves `{'state_dict', 'state_dict_ema', 'optimizer', 'prototype', ...}` of a
DistributedDataParallel net (keys start with `module.`); `state_dict` becomes our
student, `state_dict_ema` (when present) our EMA teacher, else the teacher is a copy
of the student. A bare state dict works too. `.pth` files are read with
`torch.load(weights_only=True)` (no pickled code runs); `.npz` files need no torch and
hold the same keys, bare or as `state_dict/KEY` and `state_dict_ema/KEY`.

Key mapping (our Flax path <- reference key; `module.` stripped; see `imagenet_init`
for the torchvision names and layouts):

    params/backbone/conv1, bn1          <- backbone.layer0.0, backbone.layer0.1
    params/backbone/layer3_4/conv2/...  <- backbone.layer3.4.conv2.weight
    params/head/classifier_i/{kernel,bias}  <- aspp.features.i.{weight,bias}  (OIHW -> HWIO)
    params/head/projection/{kernel,bias}    <- representation.0.{weight,bias} ((O,I,1,1) -> (I,O))

The structures match one to one (no switch needed): stride on the 3x3 conv
(torchvision v1.5), layer3/layer4 dilated 2/4 at stride 1, max-pool 3/2/1 without
ceil_mode, four biased 3x3 classifier branches (dilations 12, 24, 36, 48) summed,
a biased 1x1 projection without BN, BN eps 1e-5. `*.num_batches_tracked` is ignored.

With `config.model.arch='daformer'` the file is an mmseg checkpoint of DAFormer's UDA
model (`state_dict` with the student under `model.`, the EMA teacher under `ema_model.`
and the ImageNet feature-distance model under `imnet_model.`, which is ignored), or a
bare `backbone.*` / `decode_head.*` state dict. `backbone.*` maps through
`mix_transformer.convert_state_dict` (NVlabs names), `decode_head.*` through
`daformer_head.torch_key` (both in `daformer_head.convert_state_dict`). DAFormer has no
projection head: ours keeps its random initialisation, and the converter says so.
"""

from __future__ import annotations

import json
import os
from typing import Any

import flax.traverse_util
import jax
import ml_collections
import numpy as np

from wsda_jax.models import daformer_head, imagenet_init

DDP_PREFIX = "module."
STUDENT, TEACHER = "state_dict", "state_dict_ema"
IGNORED_SUFFIXES = ("num_batches_tracked",)
# Shown in an error: how many offending keys are named.
SHOWN_KEYS = 3
_TOP_LEVEL = {"conv1": "layer0.0", "bn1": "layer0.1"}
NO_PROJECTION = (
    "head/projection: not in the checkpoint (the method's projection head); it keeps its "
    "random initialisation (config.seed) until a run trains it (init_from)"
)


def reference_key(collection: str, path: tuple[str, ...]) -> str:
    """The reference key of one of our leaves, e.g. ('params', ('head', 'classifier_2',
    'kernel')) -> 'aspp.features.2.weight'."""
    scope, *rest = path
    if scope == "backbone":
        key = imagenet_init.torch_key(collection, tuple(rest))
        first, _, tail = key.partition(".")
        if first in _TOP_LEVEL and len(rest) == 2:  # The stem, not a block's conv1/bn1.
            key = f"{_TOP_LEVEL[first]}.{tail}"
        return f"backbone.{key}"
    module, leaf = rest
    name = "weight" if leaf == "kernel" else leaf
    if module.startswith("classifier_"):
        return f"aspp.features.{module.split('_')[1]}.{name}"
    if module == "projection":
        return f"representation.0.{name}"
    raise ValueError(f"variables: unexpected head leaf {collection}/{'/'.join(path)}")


def _reference_shape(shape: tuple[int, ...], path: tuple[str, ...]) -> tuple[int, ...]:
    if path[-2:] == ("projection", "kernel"):
        inputs, outputs = shape
        return (outputs, inputs, 1, 1)
    return imagenet_init.torch_shape(shape, path[-1])


def _to_ours(value: np.ndarray, path: tuple[str, ...]) -> np.ndarray:
    if path[-2:] == ("projection", "kernel"):
        return np.asarray(value, np.float32)[:, :, 0, 0].T.copy()
    return imagenet_init.to_flax(value, path[-1])


def _named(keys: list[str]) -> str:
    shown = ", ".join(repr(k) for k in keys[:SHOWN_KEYS])
    more = f" and {len(keys) - SHOWN_KEYS} more" if len(keys) > SHOWN_KEYS else ""
    return f"{len(keys)} ({shown}{more})"


def strip_ddp_prefix(state_dict: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keys without DistributedDataParallel's `module.` prefix."""
    return {k.removeprefix(DDP_PREFIX): v for k, v in state_dict.items()}


def convert_state_dict(
    state_dict: dict[str, np.ndarray], variables: dict[str, Any], *, name: str = STUDENT
) -> dict[str, Any]:
    """`{'params', 'batch_stats'}` of our DeepLabV2 from a DeepV2R101 state dict.

    Args:
      state_dict: reference keys (with or without `module.`) -> arrays in torch layout.
      variables: our variables (`model.init` or its `jax.eval_shape`): structure, shapes.
      name: how the state dict is named in errors ('state_dict', 'state_dict_ema').
    Returns:
      float32 NumPy leaves in our layout.
    Raises:
      ValueError, one line naming the first few missing, mis-shaped or unknown keys.
    """
    state_dict = strip_ddp_prefix(state_dict)
    has_projection = any(k.startswith("representation.") for k in state_dict)
    missing, misshaped, used, out = [], [], set(), {}
    for collection in ("params", "batch_stats"):
        flat = flax.traverse_util.flatten_dict(variables[collection])
        new_flat = {}
        for path, old in flat.items():
            key = reference_key(collection, path)
            if key not in state_dict:
                if path[:2] == ("head", "projection") and not has_projection:
                    new_flat[path] = np.asarray(old, np.float32)  # Kept: none to convert.
                    continue
                missing.append(key)
                continue
            value = np.asarray(state_dict[key])
            expected = _reference_shape(tuple(old.shape), path)
            used.add(key)
            if value.shape != expected:
                misshaped.append(f"{key} {value.shape}, expected {expected}")
                continue
            new_flat[path] = _to_ours(value, path)
        out[collection] = flax.traverse_util.unflatten_dict(new_flat)
    unknown = sorted(k for k in state_dict if k not in used and not k.endswith(IGNORED_SUFFIXES))
    if missing:
        raise ValueError(f"{name}: missing keys {_named(missing)}")
    if misshaped:
        raise ValueError(f"{name}: wrong shapes {_named(misshaped)} (another num_classes?)")
    if unknown:
        raise ValueError(f"{name}: keys our model does not have {_named(unknown)}")
    return out


def _read_pth(path: str) -> Any:
    import torch  # Optional: only .pth files need it.

    # The reference's files also hold NumPy scalars (e.g. 'mean_iu'); allowing these
    # types keeps weights_only's guarantee that no pickled code runs.
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    allowed = [np.dtype, np.float64, np.float32, np.int64, type(np.dtype(np.float64))]
    allowed.append(multiarray.scalar)
    with torch.serialization.safe_globals(allowed):
        return torch.load(path, map_location="cpu", weights_only=True)


def _to_numpy(state_dict: Any, name: str) -> dict[str, np.ndarray]:
    if not isinstance(state_dict, dict):
        raise ValueError(f"{name} is a {type(state_dict).__name__}, not a state dict")
    out = {}
    for key, value in state_dict.items():
        if hasattr(value, "detach"):
            value = value.detach().cpu().numpy()
        if not isinstance(value, np.ndarray):
            raise ValueError(f"{name}[{key!r}] is a {type(value).__name__}, not a tensor")
        out[key] = value
    return out


def read_checkpoint(path: str) -> dict[str, dict[str, np.ndarray]]:
    """{'state_dict': ..., ['state_dict_ema': ...]} of a reference `.pth` or `.npz`.

    A bare state dict is returned as 'state_dict'. Raises a one-line ValueError for a
    missing or unreadable file.
    """
    path = os.path.expanduser(path)
    if not path.endswith((".npz", ".pth", ".pt")):
        raise ValueError(f"--checkpoint={path!r}: expected a .pth or .npz file")
    if not os.path.isfile(path):
        raise ValueError(f"--checkpoint={path!r}: no such file")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                loaded = {key: np.asarray(data[key]) for key in data.files}
        else:
            loaded = _read_pth(path)
    except ImportError as error:
        raise ValueError(
            f"--checkpoint={path!r}: reading .pth needs torch, which is not installed; "
            "convert it to .npz where torch is (docs/reference_checkpoints.md)"
        ) from error
    except Exception as error:  # noqa: BLE001 - NumPy/torch raise many kinds for garbage.
        first = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
        raise ValueError(f"--checkpoint={path!r}: cannot be read ({first})") from error
    if not isinstance(loaded, dict):
        raise ValueError(f"--checkpoint={path!r}: holds a {type(loaded).__name__}, not a dict")
    if STUDENT in loaded and isinstance(loaded[STUDENT], dict):
        found = {STUDENT: _to_numpy(loaded[STUDENT], STUDENT)}
        if TEACHER in loaded:
            found[TEACHER] = _to_numpy(loaded[TEACHER], TEACHER)
        return found
    prefixes = {f"{STUDENT}/": STUDENT, f"{TEACHER}/": TEACHER}
    nested = {name: {} for name in prefixes.values()}
    bare = {}
    for key, value in loaded.items():
        prefix = next((p for p in prefixes if key.startswith(p)), None)
        if prefix is None:
            bare[key] = value
        else:
            nested[prefixes[prefix]][key[len(prefix) :]] = value
    if nested[STUDENT]:
        if bare:
            raise ValueError(f"{STUDENT}: keys our model does not have {_named(sorted(bare))}")
        found = {STUDENT: _to_numpy(nested[STUDENT], STUDENT)}
        if nested[TEACHER]:
            found[TEACHER] = _to_numpy(nested[TEACHER], TEACHER)
        return found
    return {STUDENT: _to_numpy(loaded, STUDENT)}


def converted_state(config: ml_collections.ConfigDict, checkpoint: str) -> Any:
    """Our TrainState (fresh optimizer, prototypes and step 0) holding the checkpoint's
    student and teacher. Raises a one-line ValueError before anything is written."""
    return converted_state_and_notes(config, checkpoint)[0]


def converted_state_and_notes(
    config: ml_collections.ConfigDict, checkpoint: str
) -> tuple[Any, list[str]]:
    """`converted_state` and one-line notes for the user (a projection head kept at its
    random initialisation)."""
    from wsda_jax import optim, train_state
    from wsda_jax.models import deeplab

    loaded = read_checkpoint(checkpoint)
    convert_one = convert_state_dict
    if config.model.arch == "daformer":
        student_dict, teacher_dict = daformer_head.split_uda_state_dict(loaded[STUDENT])
        loaded = {STUDENT: student_dict, **({TEACHER: teacher_dict} if teacher_dict else {})}
        convert_one = daformer_head.convert_state_dict
    elif any(k.startswith((daformer_head.UDA_STUDENT, "decode_head.")) for k in loaded[STUDENT]):
        raise ValueError(
            f"--checkpoint={checkpoint!r} is an mmseg (DAFormer / MIC) checkpoint: convert "
            "it with a config of --config.model.arch=daformer"
        )
    has_projection = any(".projection." in k or "representation." in k for k in loaded[STUDENT])
    notes = [] if has_projection else [NO_PROJECTION]
    model = deeplab.build_model(config)
    optimizer = optim.make_optimizer(config)
    # The variables' shapes do not depend on the image size: a small one is cheap.
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(config.seed), (1, 64, 64, 3), optimizer
    )
    variables = jax.device_get(state.student_variables())
    student = convert_one(loaded[STUDENT], variables, name=STUDENT)
    teacher = student
    if TEACHER in loaded:
        teacher = convert_one(loaded[TEACHER], variables, name=TEACHER)
    state = state.replace(
        params=student["params"],
        batch_stats=student["batch_stats"],
        teacher_params=jax.tree.map(np.copy, teacher["params"]),
        teacher_batch_stats=jax.tree.map(np.copy, teacher["batch_stats"]),
    )
    return state, notes


def write_checkpoint(config: ml_collections.ConfigDict, state: Any, out: str) -> str:
    """Saves `state` as step 0 of `OUT/checkpoints` (state and config items, as
    `checkpointing.save` without the data position); returns the step's folder."""
    import orbax.checkpoint as ocp

    from wsda_jax import checkpointing

    directory = checkpointing.checkpoint_dir(out)
    with checkpointing.make_manager(directory, config) as manager:
        manager.save(
            0,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state),
                config=ocp.args.JsonSave(json.loads(config.to_json())),
            ),
            force=True,
        )
        manager.wait_until_finished()
    return os.path.join(directory, "0")


def convert(config: ml_collections.ConfigDict, checkpoint: str, out: str) -> tuple[str, list[str]]:
    """Converts `checkpoint` into `out` (which must hold no checkpoints yet); returns the
    step's folder and the notes of `converted_state_and_notes`."""
    from wsda_jax import checkpointing

    directory = checkpointing.checkpoint_dir(out)
    if os.path.isdir(directory) and os.listdir(directory):
        raise ValueError(f"--out={out!r} already holds checkpoints in {directory}")
    # Every error is raised before writing.
    state, notes = converted_state_and_notes(config, checkpoint)
    return write_checkpoint(config, state, out), notes


def main() -> None:
    from absl import app, flags, logging
    from ml_collections import config_flags

    from wsda_jax import cli_errors

    config_flags.DEFINE_config_file("config", None, "The config to evaluate with later.")
    flags.DEFINE_string("checkpoint", None, "The reference's .pth (or .npz) file.")
    flags.DEFINE_string("out", None, "Workdir to write (DIR/checkpoints/0).")
    flags.mark_flags_as_required(["config", "checkpoint", "out"])

    def run(argv: list[str]) -> None:
        del argv  # cli_errors.parse_flags refuses positional arguments.
        logging.get_absl_handler().addFilter(cli_errors.quiet_orbax_logs)
        try:
            config = flags.FLAGS.config
            config.to_json()
        except OSError as error:
            raise ValueError(f"cannot load --config: {error}") from error
        written, notes = convert(config, flags.FLAGS.checkpoint, flags.FLAGS.out)
        for note in notes:
            print(f"Note: {note}")
        print(f"Wrote {written}")

    app.run(
        lambda argv: cli_errors.run_reporting_errors(run, argv),
        flags_parser=cli_errors.parse_flags,
    )


if __name__ == "__main__":
    main()
