"""The reference-checkpoint converter without torch: `.npz` files with the reference's keys.

A tiny model's variables are written under the reference's names and layouts (the
inverse of `convert.reference_key`), converted back, and compared leaf by leaf; the
CLI's bad checkpoints (a missing, an extra, a mis-shaped key) end with one line, exit 1
and nothing written. The numerical parity with the reference's own network is in
`test_reference_parity.py` (needs torch).
"""

import os
import subprocess
import sys

import flax.traverse_util
import jax
import numpy as np
import pytest
import subprocesses
from conftest import tiny_config, tiny_model
from reference_layout import reference_state_dict

from wsda_jax import evaluation
from wsda_jax.models import convert

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = "configs/synthetic_coarse.py:tiny"


def _random_variables(config, seed: int):
    variables = tiny_model(config, bn_axis_name=None).init(
        jax.random.PRNGKey(seed), np.zeros((1, 32, 32, 3), np.float32), train=False
    )
    # Distinct running statistics, so that a swapped mean/var would show.
    rng = np.random.default_rng(seed)
    stats = jax.tree.map(
        lambda x: rng.uniform(0.5, 1.5, x.shape).astype(np.float32), variables["batch_stats"]
    )
    return {"params": jax.device_get(variables["params"]), "batch_stats": stats}


def _write_checkpoint(path, student, teacher=None) -> str:
    arrays = {f"state_dict/{k}": v for k, v in student.items()}
    if teacher is not None:
        arrays.update({f"state_dict_ema/{k}": v for k, v in teacher.items()})
    np.savez(path, **arrays)
    return str(path)


def _assert_same(ours, expected):
    flat_ours = flax.traverse_util.flatten_dict(jax.device_get(ours))
    flat_expected = flax.traverse_util.flatten_dict(expected)
    assert flat_ours.keys() == flat_expected.keys()
    for key, value in flat_expected.items():
        np.testing.assert_array_equal(np.asarray(flat_ours[key]), value, err_msg=str(key))


def test_round_trip_student_and_ema_teacher(tmp_path):
    config = tiny_config()
    student, teacher = _random_variables(config, 0), _random_variables(config, 1)
    path = _write_checkpoint(
        tmp_path / "wdass.npz", reference_state_dict(student), reference_state_dict(teacher)
    )
    state = convert.converted_state(config, path)
    _assert_same(state.student_variables(), student)
    _assert_same(state.teacher_variables(), teacher)


def test_bare_state_dict_gives_the_teacher_a_copy_of_the_student(tmp_path):
    config = tiny_config()
    student = _random_variables(config, 0)
    path = tmp_path / "bare.npz"
    np.savez(path, **reference_state_dict(student, prefix=""))
    state = convert.converted_state(config, str(path))
    _assert_same(state.student_variables(), student)
    _assert_same(state.teacher_variables(), student)


def test_key_names_of_the_reference_network():
    """A few names as the reference's DeepV2R101 state_dict has them."""
    assert convert.reference_key("params", ("backbone", "conv1", "kernel")) == (
        "backbone.layer0.0.weight"
    )
    assert convert.reference_key("batch_stats", ("backbone", "bn1", "var")) == (
        "backbone.layer0.1.running_var"
    )
    assert convert.reference_key("params", ("backbone", "layer1_0", "conv1", "kernel")) == (
        "backbone.layer1.0.conv1.weight"
    )
    assert convert.reference_key("params", ("backbone", "layer3_0", "downsample_bn", "scale")) == (
        "backbone.layer3.0.downsample.1.weight"
    )
    assert convert.reference_key("params", ("head", "classifier_3", "bias")) == (
        "aspp.features.3.bias"
    )
    assert convert.reference_key("params", ("head", "projection", "kernel")) == (
        "representation.0.weight"
    )


def _convert_cli(tmp_path, checkpoint):
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "wsda_jax.models.convert",
            f"--checkpoint={checkpoint}",
            f"--config={TINY}",
            f"--out={out}",
        ],
        cwd=ROOT,
        env=subprocesses.jax_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    return result, out


def _tiny_reference_state_dict():
    from configs import synthetic_coarse

    config = synthetic_coarse.get_config("tiny")
    model = tiny_model(config, bn_axis_name=None)
    variables = model.init(jax.random.PRNGKey(0), np.zeros((1, 32, 32, 3)), train=False)
    return reference_state_dict(jax.device_get(variables))


@pytest.mark.parametrize(
    "break_it, named",
    [
        (
            lambda sd: sd.pop("module.aspp.features.1.bias"),
            "missing keys 1 ('aspp.features.1.bias')",
        ),
        (
            lambda sd: sd.__setitem__("module.aspp.img_conv.0.weight", np.zeros(3)),
            "keys our model does not have 1 ('aspp.img_conv.0.weight')",
        ),
        (
            lambda sd: sd.__setitem__(
                "module.aspp.features.0.weight", np.zeros((19, 128, 3, 3), np.float32)
            ),
            "wrong shapes 1 ('aspp.features.0.weight (19, 128, 3, 3), expected",
        ),
    ],
    ids=["missing", "extra", "wrong_shape"],
)
def test_bad_checkpoint_one_line_exit_1_nothing_written(tmp_path, break_it, named):
    state_dict = _tiny_reference_state_dict()
    break_it(state_dict)
    checkpoint = _write_checkpoint(tmp_path / "bad.npz", state_dict)
    result, out = _convert_cli(tmp_path, checkpoint)
    assert result.returncode == 1, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: state_dict: "), result.stderr
    assert named in lines[0], lines[0]
    assert not out.exists()


def test_report_name_keeps_other_settings_apart():
    config = tiny_config()
    trained = evaluation.eval_settings(config)
    assert evaluation.report_name(trained, trained, 7) == "7"
    assert evaluation.report_name(trained, None, 7) == "7"  # The training run itself.
    config.eval.scales = (0.5, 1.0, 2.0)
    config.eval.flip = True
    settings = evaluation.eval_settings(config)
    assert settings["scales"] == [0.5, 1.0, 2.0] and settings["flip"] is True
    assert evaluation.report_name(settings, trained, 7) == "7_scales0.5-1-2_flip_float32"
    # A setting that does not change the numbers keeps the name.
    config = tiny_config()
    config.eval.images_per_forward = 2
    assert evaluation.report_name(evaluation.eval_settings(config), trained, 7) == "7"


# ----- DAFormer / MIC (mmseg) checkpoints -----


def _daformer_config(arch="daformer"):
    from configs import synthetic_coarse

    config = synthetic_coarse.get_config("tiny")  # Its MiT-B0 of one narrow block per stage.
    config.model.arch = arch
    return config


def _random_daformer_variables(config, seed):
    """Host-drawn variables of the tiny DAFormer (distinct BN statistics)."""
    from wsda_jax.models import deeplab

    model = deeplab.build_model(config)
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.key(0), np.zeros((1, 32, 64, 3), np.float32), train=False)
    )
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.uniform(0.5, 1.5, s.shape).astype(np.float32), shapes)


def _mmseg_state_dict(variables):
    """Our variables under mmseg's DAFormer keys (`backbone.*` NVlabs names,
    `decode_head.*`) and torch layouts; the projection head has no key."""
    from wsda_jax.models import daformer_head, mix_transformer

    out = {}
    backbone = mix_transformer.unstack_blocks(variables["params"]["backbone"])
    for path, leaf in flax.traverse_util.flatten_dict(backbone).items():
        out[f"backbone.{mix_transformer.torch_key(path)}"] = _torch_layout(leaf)
    for collection in ("params", "batch_stats"):
        head = flax.traverse_util.flatten_dict(variables[collection]["head"])
        for path, leaf in head.items():
            key = daformer_head.torch_key(path)
            if key is not None:
                out[f"decode_head.{key}"] = _torch_layout(leaf)
    out["decode_head.conv_seg.num_batches_tracked"] = np.asarray(7)
    return out


def _torch_layout(leaf):
    leaf = np.asarray(leaf)
    return leaf.transpose(3, 2, 0, 1) if leaf.ndim == 4 else leaf.T if leaf.ndim == 2 else leaf


def _write_uda_checkpoint(path, student, teacher):
    """A released DAFormer checkpoint's `state_dict`: model.*, ema_model.*, imnet_model.*."""
    arrays = {f"state_dict/model.{k}": v for k, v in student.items()}
    arrays.update({f"state_dict/ema_model.{k}": v for k, v in teacher.items()})
    arrays["state_dict/imnet_model.backbone.norm4.weight"] = np.zeros(3, np.float32)
    np.savez(path, **arrays)
    return str(path)


def test_daformer_round_trip_student_teacher_projection_kept(tmp_path):
    config = _daformer_config()
    student, teacher = _random_daformer_variables(config, 0), _random_daformer_variables(config, 1)
    path = _write_uda_checkpoint(
        tmp_path / "daformer.npz", _mmseg_state_dict(student), _mmseg_state_dict(teacher)
    )
    state, notes = convert.converted_state_and_notes(config, path)
    assert notes == [convert.NO_PROJECTION]
    for ours, want in ((state.student_variables(), student), (state.teacher_variables(), teacher)):
        ours, want = jax.device_get(ours), jax.tree.map(np.asarray, want)
        # The projection head keeps the fresh initialisation (not the file's 0.5..1.5).
        projection = ours["params"]["head"].pop("projection")
        assert projection["kernel"].shape == (16, config.model.proj_dim)
        assert np.abs(projection["kernel"]).min() < 0.5
        del want["params"]["head"]["projection"]
        _assert_same(ours, want)


@pytest.mark.parametrize(
    "break_it, named",
    [
        (lambda sd: sd.pop("decode_head.conv_seg.bias"), "missing keys 1 ('decode_head.conv_"),
        (
            lambda sd: sd.__setitem__("decode_head.scale_attention.conv_seg.bias", np.zeros(3)),
            "an HRDA multi-resolution head",
        ),
        (
            lambda sd: sd.__setitem__("decode_head.conv_seg.weight", np.zeros((5, 16, 1, 1))),
            "wrong shapes 1 ('decode_head.conv_seg.weight (5, 16, 1, 1), expected (19, 16, 1, 1)",
        ),
        (lambda sd: sd.pop("backbone.norm4.weight"), "backbone.*: MiT state_dict: 1 missing"),
    ],
    ids=["missing", "hrda", "wrong_shape", "backbone"],
)
def test_bad_daformer_checkpoint_is_named(break_it, named):
    from wsda_jax.models import daformer_head

    variables = _random_daformer_variables(_daformer_config(), 0)
    state_dict = _mmseg_state_dict(variables)
    break_it(state_dict)
    with pytest.raises(ValueError, match=named.replace("(", r"\(").replace(")", r"\)")):
        daformer_head.convert_state_dict(state_dict, variables)


def test_daformer_checkpoint_needs_the_daformer_arch(tmp_path):
    config = _daformer_config()
    state_dict = _mmseg_state_dict(_random_daformer_variables(config, 0))
    path = _write_uda_checkpoint(tmp_path / "daformer.npz", state_dict, state_dict)
    with pytest.raises(ValueError, match="--config.model.arch=daformer"):
        convert.converted_state(_daformer_config("deeplabv2"), path)
