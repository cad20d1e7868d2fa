"""Every experiment config loads and validates; reference ones keep the paper's values."""

import glob
import importlib.util
import os

import pytest

from wsda_jax import config_lib, config_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILES = sorted(glob.glob(os.path.join(ROOT, "configs", "*.py")))
REFERENCE = [p for p in CONFIG_FILES if not os.path.basename(p).startswith("synthetic_")]
SYNTHETIC = [p for p in CONFIG_FILES if os.path.basename(p).startswith("synthetic_")]


def _load(path, arg=None):
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert "Command" in module.__doc__ and "Expected result" in module.__doc__
    return module.get_config(arg)


def test_all_configs_present():
    names = {os.path.basename(p)[:-3] for p in CONFIG_FILES}
    expected = {"gta_source_only", "synthia_source_only"}
    expected |= {
        f"{s}2cs_{w}" for s in ("gta", "synthia") for w in ("uda", "image", "point", "coarse")
    }
    expected |= {
        f"synthetic_{v}" for v in ("oracle", "source_only", "uda", "image", "point", "coarse")
    }
    assert names == expected


def _expected_stage_and_weak_label(name):
    if name.endswith("source_only"):
        return "source_only", "none"
    if name.endswith("oracle"):
        return "oracle", "none"
    weak = name.rsplit("_", 1)[1]
    return "adapt", "none" if weak == "uda" else weak


@pytest.mark.parametrize("path", CONFIG_FILES, ids=os.path.basename)
def test_config_loads_and_validates(path):
    config = _load(path)
    config_lib.validate(config, num_devices=1)
    config_lib.validate(config, num_devices=4)
    name = os.path.basename(path)[:-3]
    assert (config.stage, config.weak_label) == _expected_stage_and_weak_label(name)


def _flat(tree, prefix=""):
    """{'a.b.c': value} of a nested dict (a ConfigDict's to_dict())."""
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("path", REFERENCE, ids=os.path.basename)
def test_reference_configs_change_only_source_target_stage_and_weak_label(path):
    """The paper's hyper-parameters live in base_config once; a reference config file
    changes only what its name says (and SYNTHIA's rare-class pixel count)."""
    config, base = _flat(_load(path).to_dict()), _flat(config_lib.base_config().to_dict())
    assert config.keys() == base.keys()
    changed = {key for key in config if config[key] != base[key]}
    allowed = {"data.source", "data.target", "stage", "weak_label"}
    if "synthia" in path:
        allowed.add("data.rare_class_sampling.min_pixels")
    assert changed <= allowed, changed - allowed
    assert config["data.source"] == ("synthia" if "synthia" in path else "gta5")
    assert config["data.target"] == "cityscapes_weak"
    # DAFormer's 3000-px image filter counts GTA5's 1914x1052 labels: by area at the
    # prepared 1280x720. SYNTHIA's labels are not resized.
    gta5_pixels = round(3000 * 1280 * 720 / (1914 * 1052))
    expected = 3000 if "synthia" in path else gta5_pixels
    assert config["data.rare_class_sampling.min_pixels"] == expected


@pytest.mark.parametrize("path", SYNTHETIC, ids=os.path.basename)
def test_synthetic_configs_are_laptop_sized(path):
    config = _load(path)
    assert (config.data.source, config.data.target) == ("synthetic_source", "synthetic_target")
    assert (config.data.synthetic.height, config.data.synthetic.width) == (128, 256)
    assert config.model.depth == 18 and config.num_steps <= 1200
    assert config.loss.contrast_start < config.num_steps
    # 15 and 120 of 512 crop rows, scaled to the 96-row crop.
    assert tuple(config.data.crop_size) == (96, 192)
    assert (config.pseudo.ignore_top, config.pseudo.ignore_bottom) == (3, 22)

    tiny = _load(path, "tiny")
    config_lib.validate(tiny, num_devices=4)
    assert tiny.num_steps <= 8 and tiny.data.synthetic.num_source <= 16
    assert tuple(tiny.data.crop_size) == (32, 64)
    assert tiny.stage == config.stage and tiny.weak_label == config.weak_label
    with pytest.raises(ValueError, match="unknown config variant"):
        _load(path, "huge")


ADAPT = [
    p
    for p in CONFIG_FILES
    if _expected_stage_and_weak_label(os.path.basename(p)[:-3])[0] == "adapt"
]
# What `:daformer` changes in a reference config (docs/daformer.md): its recipe, nothing else.
DAFORMER = {
    "init.one_stage": True,
    "model.arch": "daformer",
    "num_steps": 40_000,
    "per_device_batch_size": 2,
    "optim.name": "adamw",
    "optim.lr": 6e-5,
    "optim.weight_decay": 0.01,
    "optim.power": 1.0,
    "ema.ramp": True,
    "data.rare_class_sampling.enabled": True,
    "loss.imnet_fd": 0.005,
    "loss.contrast_start": 4000,
    "eval.every_steps": 4000,
}


@pytest.mark.parametrize("path", [p for p in ADAPT if p in REFERENCE], ids=os.path.basename)
def test_reference_daformer_switch(path):
    """`file.py:daformer` validates and differs from the file's config in DAFormer's recipe
    only; the values the reference already shares with DAFormer stay."""
    plain, config = _flat(_load(path).to_dict()), _load(path, "daformer")
    config_lib.validate(config, num_devices=8)
    flat = _flat(config.to_dict())
    changed = {key for key in flat if flat[key] != plain[key]}
    assert changed == set(DAFORMER), changed ^ set(DAFORMER)
    assert {key: flat[key] for key in DAFORMER} == DAFORMER
    assert (flat["ema.decay"], flat["pseudo.threshold"]) == (0.999, 0.968)
    assert (flat["pseudo.ignore_top"], flat["pseudo.ignore_bottom"]) == (15, 120)
    assert flat["init.init_from"] == "" and flat["optim.warmup_steps"] == 1500
    assert (flat["model.mit"], flat["model.drop_path_rate"]) == ("b5", 0.1)
    # DAFormer's crop bound, 3000 * 0.5 pixels of its 1280-wide training crops.
    assert flat["data.rare_class_sampling.min_crop_pixels"] == 1500


@pytest.mark.parametrize("path", [p for p in ADAPT if p in SYNTHETIC], ids=os.path.basename)
def test_synthetic_daformer_switch(path):
    config = _load(path, "daformer")
    config_lib.validate(config, num_devices=1)
    assert config.model.arch == "daformer" and config.optim.name == "adamw"
    assert config.init.one_stage and config.loss.imnet_fd == 0.0  # No ImageNet weights.
    assert config.loss.contrast_start < config.num_steps == 1200
    assert config.mic.block_size == 6 and config.data.rare_class_sampling.enabled
    # DAFormer's 1500-px crop bound in a 1280x720 image, by area in a 128x256 one.
    assert config.data.rare_class_sampling.min_crop_pixels == round(1500 * 128 * 256 / 921600)
    for arg in ("daformer,tiny", "tiny,daformer"):
        tiny = _load(path, arg)
        config_lib.validate(tiny, num_devices=4)
        assert tiny.model.arch == "daformer" and tiny.num_steps <= 8


@pytest.mark.parametrize("path", [p for p in CONFIG_FILES if p not in ADAPT], ids=os.path.basename)
def test_daformer_is_refused_outside_adaptation(path):
    with pytest.raises(ValueError, match="one-stage adaptation") as error:
        _load(path, "daformer")
    assert "\n" not in str(error.value)


# What `:mit` changes in a synthetic config: the network and optimiser of its `:daformer`.
SYNTHETIC_MIT = {
    "model.arch": "daformer",
    "model.mit": "b0",
    "model.mit_embed_dims": (16, 32, 80, 128),
    "model.mit_depths": (1, 1, 1, 1),
    "model.decoder_dim": 32,
    "model.drop_path_rate": 0.1,
    "optim.name": "adamw",
    "optim.lr": 4 * 6e-5,
    "optim.weight_decay": 0.01,
    "optim.head_lr_mult": 10.0,
    "optim.warmup_ratio": 1e-6,
    "optim.power": 1.0,
}


@pytest.mark.parametrize("path", SYNTHETIC, ids=os.path.basename)
def test_synthetic_mit_switch_swaps_the_network_in_any_stage(path):
    """`file.py:mit`: the small MiT and AdamW of `:daformer` in the file's own stage and
    schedule (steps, warm-up, EMA, contrastive start), for the oracle and source-only
    bounds of that network; combined with `daformer` it is refused."""
    plain, config = _flat(_load(path).to_dict()), _load(path, "mit")
    config_lib.validate(config, num_devices=1)
    flat = _flat(config.to_dict())
    changed = {key for key in flat if flat[key] != plain[key]}
    assert changed <= set(SYNTHETIC_MIT) | {"optim.betas"}, changed - set(SYNTHETIC_MIT)
    assert {key: flat[key] for key in SYNTHETIC_MIT} == SYNTHETIC_MIT
    if path in ADAPT:  # The network and optimiser of `:daformer`, not its recipe.
        daformer = _flat(_load(path, "daformer").to_dict())
        assert {key: daformer[key] for key in SYNTHETIC_MIT} == SYNTHETIC_MIT
        with pytest.raises(ValueError, match="choose one"):
            _load(path, "daformer,mit")
    tiny = _load(path, "mit,tiny")
    config_lib.validate(tiny, num_devices=1)
    assert tiny.model.arch == "daformer" and tiny.num_steps <= 8


def test_model_name_says_which_network():
    """The network in the AOT figures, the device check and the benchmarks' lines."""
    path = os.path.join(ROOT, "configs", "gta2cs_coarse.py")
    synthetic = os.path.join(ROOT, "configs", "synthetic_coarse.py")
    assert config_model.model_name(_load(path)) == "ResNet-101 w64"
    assert config_model.model_name(_load(path, "daformer")) == "MiT-B5 + DAFormer head d256"
    assert config_model.model_name(_load(synthetic, "daformer")) == (
        "MiT widths (16, 32, 80, 128) + DAFormer head d32"
    )
