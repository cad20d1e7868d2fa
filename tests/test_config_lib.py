"""Bad configurations fail with one clear ValueError before anything is compiled."""

import pytest

from wsda_jax import config_lib


def _config(**changes):
    config = config_lib.base_config()
    for dotted, value in changes.items():
        node = config
        *parents, leaf = dotted.split("__")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return config


def test_reference_defaults_validate():
    config_lib.validate(config_lib.base_config(), num_devices=4)
    assert config_lib.base_config().model.arch == "deeplabv2"


def test_daformer_with_tiny_mit_validates():
    changes = {"model__arch": "daformer", "model__mit": "b0", "data__crop_size": (32, 64)}
    changes.update(model__mit_embed_dims=(8, 8, 10, 16), model__remat="blocks")
    changes.update(pseudo__ignore_top=1, pseudo__ignore_bottom=4)
    config_lib.validate(_config(**changes), num_devices=1)


@pytest.mark.parametrize(
    ("changes", "num_devices", "message"),
    [
        ({"weak_label": "scribble"}, 1, "config.weak_label='scribble'"),
        ({"stage": "finetune"}, 1, "config.stage='finetune'"),
        ({"model__depth": 152}, 1, "config.model.depth=152"),
        ({"per_device_batch_size": 0}, 4, "config.per_device_batch_size=0: must be an integer"),
        ({"eval__per_device_batch_size": 0}, 1, "config.eval.per_device_batch_size=0"),
        ({"presence": "tags"}, 1, "config.presence='tags'"),
        ({"eval__images_per_forward": 3}, 1, "config.eval.images_per_forward=3"),
        ({"init__teacher": "fresh"}, 1, "config.init.teacher='fresh'"),
        ({"loss__boundary_max": "batch"}, 1, "config.loss.boundary_max='batch'"),
        ({"loss__contrast_start": -1}, 1, "contrast_start=-1 must be >= 0"),
        ({"data__crop_size": (8, 8)}, 1, "config.data.crop_size=(8, 8)"),
        ({"data__crop_size": (100, 64)}, 1, "multiples of the output stride 8"),
        ({"compute_dtype": "float16"}, 1, "config.compute_dtype='float16'"),
        ({"model__remat": "all"}, 1, "config.model.remat='all': expected one of"),
        ({"optim__name": "lamb"}, 1, "config.optim.name='lamb': expected one of"),
        ({"optim__betas": (0.9, 1.0)}, 1, "config.optim.betas=(0.9, 1.0) must be two numbers"),
        ({"optim__warmup_ratio": 2.0}, 1, "config.optim.warmup_ratio=2.0 must be in"),
        ({"stage": "source_only", "loss__imnet_fd": 0.005}, 1, "only in stage 'adapt'"),
        ({"loss__imnet_fd_classes": (6, 19)}, 1, "imnet_fd_classes: \\[19\\] are not"),
        ({"loss__imnet_fd_min_ratio": 1.5}, 1, "config.loss.imnet_fd_min_ratio=1.5 must be"),
        ({"init__one_stage": True, "init__init_from": "w"}, 1, "not from config.init.init_from"),
        ({"init__one_stage": True, "stage": "source_only"}, 1, "a one-stage run adapts"),
        ({"model__arch": "vit"}, 1, "config.model.arch='vit'"),
        ({"model__arch": "daformer", "data__crop_size": (80, 64)}, 1, "multiples of 32"),
        ({"model__arch": "daformer", "model__mit": "b6"}, 1, "config.model.mit='b6'"),
        ({"model__arch": "daformer", "model__mit_embed_dims": (8,) * 4}, 1, "mit_embed_dims"),
        ({"model__arch": "daformer", "model__mit_depths": (1, 0, 1, 1)}, 1, "mit_depths"),
        ({"model__arch": "daformer", "model__remat": "conv_outputs"}, 1, "arch 'daformer'"),
        ({"model__drop_path_rate": 1.5}, 1, "config.model.drop_path_rate=1.5"),
        ({"model__decoder_dim": 0}, 1, "config.model.decoder_dim=0"),
        ({"data__crop_size": ("abc",)}, 1, "config.data.crop_size=('abc',) must be a sequence"),
        ({"data__crop_size": (64,)}, 1, "config.data.crop_size=(64,) must be a pair"),
        ({"data__eval_resize": ("abc",)}, 1, "config.data.eval_resize=('abc',) must be a seq"),
        ({"data__eval_resize": (4, 4)}, 1, "config.data.eval_resize=(4, 4): both sides"),
        ({"seed": -1}, 1, "config.seed=-1 must be >= 0"),
        ({"model__aspp_dilations": (0,)}, 1, "config.model.aspp_dilations=(0,): one or more"),
        ({"model__aspp_dilations": ()}, 1, "config.model.aspp_dilations=(): one or more"),
        ({"data__crop_size": (128, 128)}, 1, "= 135 rows leave no row of the 128-row crop"),
        ({"num_classes": 20}, 1, "config.num_classes=20 must be in"),
    ],
)
def test_bad_config_is_named(changes, num_devices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(_config(**changes), num_devices=num_devices)
