"""The types of a config's values, checked against the defaults before any work.

Every key that `config_lib.base_config()` has must keep its default's type (an override
such as `--config.data.eval_resize=abc` or `--config.data.crop_size=5` otherwise runs until
the value is first used, after compiling); the pair keys must be pairs. Nothing here
imports JAX.
"""

from __future__ import annotations

import ml_collections

# The elements of the sequence keys whose default is empty (other sequences: their
# default's first element says).
ELEMENT_TYPES = {"data.eval_resize": int, "model.stage_sizes": int}
# Keys that hold a pair ((height, width) or (low, high)); eval_resize may also be ().
PAIRS = ("data.crop_size", "data.scale_range", "classmix.blur_sigma", "data.eval_resize")


def leaves(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    """{'data.crop_size': (512, 512), ...}: every key of `config` with a value."""
    found = {}
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            found.update(leaves(value, f"{prefix}{key}."))
        else:
            found[f"{prefix}{key}"] = value
    return found


def _kind(default: object) -> tuple[type, ...]:
    """The types a value may have where `default` stands: an integer where a float is."""
    if isinstance(default, bool):
        return (bool,)
    if isinstance(default, float):
        return (int, float)
    return (type(default),)


def _words(kind: tuple[type, ...]) -> str:
    words = {bool: "True or False", int: "integers", float: "numbers", str: "strings"}
    return words.get(kind[-1], kind[-1].__name__)


def _fits(value: object, kind: tuple[type, ...]) -> bool:
    return isinstance(value, kind) and (bool in kind or not isinstance(value, bool))


def validate_types(config: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
    """Raises a one-line ValueError naming the first key whose value has another type than
    its default in `defaults` (`config_lib.base_config()`): a bool, an integer, a number,
    a string, or a sequence of one of these; or a pair key (`PAIRS`) that is not a pair.
    Keys without a default there (a config's own) are left to the code that reads them."""
    defaults = leaves(defaults)
    for key, value in leaves(config).items():
        default = defaults.get(key)
        if default is None:
            continue
        if isinstance(default, tuple | list):
            kind = _kind(default[0]) if default else (ELEMENT_TYPES.get(key, object),)
            if not isinstance(value, tuple | list) or not all(_fits(v, kind) for v in value):
                raise ValueError(f"config.{key}={value!r} must be a sequence of {_words(kind)}")
        elif not _fits(value, _kind(default)):
            raise ValueError(f"config.{key}={value!r} must be {_words(_kind(default))}")
    for key in PAIRS:
        present, pair = lookup(config, key)
        if present and not (len(pair) == 2 or (key == "data.eval_resize" and not pair)):
            empty = " or ()" if key == "data.eval_resize" else ""
            raise ValueError(f"config.{key}={tuple(pair)!r} must be a pair (2 values){empty}")
    present, resize = lookup(config, "data.eval_resize")
    if present and any(side < 8 for side in resize):
        raise ValueError(f"config.data.eval_resize={tuple(resize)!r}: both sides must be >= 8")


def lookup(config: ml_collections.ConfigDict, key: str) -> tuple[bool, object]:
    """(True, value) of the dotted `key` ('data.crop_size'), (False, None) when the config
    lacks it (another version of it)."""
    node = config
    for part in key.split("."):
        if part not in node:
            return False, None
        node = node[part]
    return True, node
