"""Every experiment config loads and validates; reference ones keep the paper's values."""

import glob
import importlib.util
import os

import pytest

from wsda_jax import config_lib

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


@pytest.mark.parametrize("path", REFERENCE, ids=os.path.basename)
def test_reference_configs_carry_paper_hyper_parameters(path):
    config = _load(path)
    assert config.data.source == ("synthia" if "synthia" in path else "gta5")
    assert config.data.target == "cityscapes_weak"
    assert config.num_classes == 19
    assert (config.model.depth, config.model.width, config.model.proj_dim) == (101, 64, 256)
    assert tuple(config.model.aspp_dilations) == (12, 24, 36, 48)
    assert config.per_device_batch_size == 4 and tuple(config.data.crop_size) == (512, 512)
    assert tuple(config.data.scale_range) == (0.5, 2.0) and config.data.jitter == 0.25
    assert config.num_steps == 150_000
    optim = config.optim
    assert (optim.lr, optim.head_lr_mult, optim.momentum) == (2.5e-3, 10.0, 0.9)
    assert (optim.weight_decay, optim.warmup_steps, optim.power) == (1e-4, 1500, 0.9)
    assert config.ema.decay == 0.999 and not config.ema.ramp
    loss = config.loss
    assert (loss.seg_mix, loss.seg_s, loss.seg_u, loss.edge_s) == (1.0, 1.0, 1.0, 10.0)
    assert (loss.inter, loss.intra_tgt, loss.intra_src) == (0.5, 0.25, 0.25)
    assert (loss.im_u, loss.im_proto, loss.contrast_start) == (1.0, 1.0, 10_000)
    assert (loss.temperature, loss.base_temperature, loss.max_views) == (0.1, 0.07, 20)
    assert (loss.inter_max_samples, loss.intra_max_samples) == (512, 256)
    assert (config.pseudo.threshold, config.pseudo.proto_threshold) == (0.968, 0.95)
    assert (config.pseudo.ignore_top, config.pseudo.ignore_bottom) == (15, 120)
    assert config.classmix.enabled and not config.classmix.per_image
    assert tuple(config.eval.scales) == (1.0,)


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
