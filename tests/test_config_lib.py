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
        ({"data__crop_size": ("abc",)}, 1, "config.data.crop_size=('abc',) must be a sequence"),
        ({"data__crop_size": (64,)}, 1, "config.data.crop_size=(64,) must be a pair"),
        ({"data__eval_resize": ("abc",)}, 1, "config.data.eval_resize=('abc',) must be a seq"),
        ({"data__eval_resize": (4, 4)}, 1, "config.data.eval_resize=(4, 4): both sides"),
        ({"seed": -1}, 1, "config.seed=-1 must be >= 0"),
    ],
)
def test_bad_config_is_named(changes, num_devices, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(_config(**changes), num_devices=num_devices)
