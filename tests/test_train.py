"""In process, end to end: `train.train_and_evaluate` on the tiny synthetic config (the
Flax examples' train_test.py pattern), then the eval and predict modes on its workdir,
the oracle stage and ImageNet initialisation.

One 4-step coarse run (module fixture) is shared; the tiny dataset is generated once
under pytest's base temp directory (shared with the subprocess tests).
"""

import importlib.util
import json
import logging
import os

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import PIL.Image
import pytest
import tiny_runs
from torchvision_weights import WIDTH, random_state_dict

from wsda_jax import (
    checkpointing,
    classes,
    config_lib,
    optim,
    parallel,
    steps,
    train,
    train_state,
)
from wsda_jax.data import sources
from wsda_jax.models import deeplab

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERMS = ("seg_mix", "seg_s", "seg_u", "edge_s", "inter", "intra_src", "intra_tgt")
TERMS += ("im_u", "im_proto")


def tiny_config(name, base):
    """configs/NAME.py:tiny with its dataset under the shared base temp directory."""
    path = os.path.join(ROOT, "configs", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config("tiny")
    config.data.data_dir = str(base / "data")
    return config


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """(config, workdir, report) of 4 steps, step 3 profiled: the program of the CLI's
    tiny run (`tiny_cli_run`), read from the compilation cache when that ran first."""
    config = tiny_config("synthetic_coarse", tmp_path_factory.getbasetemp())
    config.profile.start_step, config.profile.num_steps = 2, 1
    workdir = tmp_path_factory.mktemp("train") / "run"
    report = train.train_and_evaluate(config, str(workdir))
    return config, workdir, report


def test_train_writes_metrics_checkpoints_and_eval(tiny_run):
    _, workdir, report = tiny_run
    assert tiny_runs.assert_tiny_run_outputs(workdir) == report
    assert "step 4" in train.progress_summary(str(workdir))


def test_an_unreadable_evaluation_report_does_not_fail_the_finished_run(tmp_path):
    """The summary printed after training names a damaged report instead of raising
    (which would end a finished run, and a `stage1 && stage2` chain, with status 1)."""
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "0.json").write_text(json.dumps({"student": {"miou": 0.25}}))
    (tmp_path / "eval" / "4.json").write_text('{"student": {"miou"')
    assert train.progress_summary(str(tmp_path)) == (
        "Target val mIoU (%): step 0: student 25.0; step 4: report unreadable."
    )
    (tmp_path / "eval" / "4.json").write_text("null")  # JSON, but not a report.
    assert train.progress_summary(str(tmp_path)).endswith("step 4: report unreadable.")


def test_profile_trace_in_the_tensorboard_folder(tiny_run):
    _, workdir, _ = tiny_run
    traces = list((workdir / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
    assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_contrast_start_gate_in_the_train_loop(tmp_path_factory, monkeypatch):
    """docs/method.md §4.11: c = i = 0 before contrast_start (2): the train loop runs the
    program without the contrastive and image-level terms at steps 0-1 and the one with
    them from step 2 (the two programs: test_contrast_switch.py)."""
    config = tiny_config("synthetic_coarse", tmp_path_factory.getbasetemp())
    config.loss.contrast_start = 2

    def program(step_fn, mesh, *, contrast_on=None, **kwargs):
        assert step_fn is steps.adapt_step
        return lambda state, batch: contrast_on

    monkeypatch.setattr(parallel, "shard_train_step", program)
    step = train.make_train_step(config, model=None, optimizer=None, mesh=None)
    assert [step(None, None, done) for done in range(4)] == [False, False, True, True]


def test_total_is_the_sum_of_the_logged_terms(tiny_run):
    """The logged total is the sum of exactly the method's (weighted) terms."""
    _, workdir, _ = tiny_run
    for line in tiny_runs.train_lines(workdir):
        assert {name for name in TERMS if name in line} == set(TERMS)
        np.testing.assert_allclose(line["total"], sum(line[name] for name in TERMS), rtol=1e-5)


def test_weighted_terms_are_the_method_total():
    """docs/method.md §4.11 with the base config's weights, written out by hand: seg_mix +
    seg_s + seg_u + 10 edge_s + c (0.5 inter + 0.25 intra_tgt + 0.25 intra_src) +
    i (im_u + im_proto), on distinct unweighted values; before contrast_start (c = i = 0)
    the program computes only the terms outside `contrast_on_terms`."""
    config = config_lib.base_config()
    loss = config.loss
    raw = dict(zip(TERMS, (1.0, 2.0, 3.0, 5.0, 7.0, 13.0, 11.0, 17.0, 19.0), strict=True))
    contrast_on_terms = steps.contrast_on_terms(config)
    assert set(contrast_on_terms) == {"inter", "intra_src", "intra_tgt", "im_u", "im_proto"}
    off = {name: value for name, value in raw.items() if name not in contrast_on_terms}
    before = steps.weighted_terms(off, loss)
    after = steps.weighted_terms(raw, loss)
    assert float(sum(before.values())) == pytest.approx(1 + 2 + 3 + 10 * 5)
    expected = 1 + 2 + 3 + 10 * 5 + 0.5 * 7 + 0.25 * 11 + 0.25 * 13 + 17 + 19
    assert float(sum(after.values())) == pytest.approx(expected)
    assert float(after["intra_tgt"]) == pytest.approx(0.25 * 11)
    assert float(after["inter"]) == pytest.approx(0.5 * 7)
    # Plain UDA has no image-level terms; without use_contrast no contrastive ones.
    config.weak_label = "none"
    assert set(steps.contrast_on_terms(config)) == {"inter", "intra_src", "intra_tgt"}
    config.weak_label, config.loss.use_contrast = "coarse", False
    assert set(steps.contrast_on_terms(config)) == {"im_u", "im_proto"}


def test_contrast_ramp_scales_only_the_contrastive_terms():
    """contrast_ramp_steps = 4 from contrast_start = 10: factors 0, 1/4, ..., 1; the
    image-level terms keep their plain weight."""
    config = config_lib.base_config()
    config.loss.contrast_start = 10
    assert float(steps.contrast_ramp(jnp.int32(50), config)) == 1.0  # 0: the reference.
    config.loss.contrast_ramp_steps = 4
    factors = [float(steps.contrast_ramp(jnp.int32(s), config)) for s in (9, 10, 11, 13, 20)]
    assert factors == [0.0, 0.25, 0.5, 1.0, 1.0]
    raw = dict(zip(TERMS, (1.0, 2.0, 3.0, 5.0, 7.0, 13.0, 11.0, 17.0, 19.0), strict=True))
    ramped = steps.weighted_terms(raw, config.loss, np.float32(0.25))
    assert float(ramped["inter"]) == pytest.approx(0.25 * 0.5 * 7)
    assert float(ramped["intra_tgt"]) == pytest.approx(0.25 * 0.25 * 11)
    assert float(ramped["im_u"]) == pytest.approx(1.0 * raw["im_u"])
    assert float(ramped["seg_s"]) == pytest.approx(raw["seg_s"])


def test_eval_mode_reproduces_the_training_evaluation(tiny_run):
    config, workdir, report = tiny_run
    os.remove(workdir / "eval" / "4.json")
    assert train.evaluate_checkpoint(config, str(workdir)) == report
    assert json.load(open(workdir / "eval" / "4.json")) == report


def test_predict_mode_writes_colourised_pngs(tiny_run, tmp_path):
    config, workdir, _ = tiny_run
    inputs, outputs = tmp_path / "in", tmp_path / "out"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    sizes = {"a.png": (32, 48), "b.jpg": (40, 24)}
    for name, size in sizes.items():
        PIL.Image.fromarray(rng.integers(0, 255, (*size, 3), np.uint8)).save(inputs / name)
    (inputs / "notes.txt").write_text("not an image")
    written = train.predict_images(config, str(workdir), str(inputs), str(outputs))
    assert sorted(os.listdir(outputs)) == ["a.png", "b.png"] and len(written) == 2
    palette = {tuple(c) for c in classes.PALETTE[: classes.NUM_CLASSES]}
    for name, size in sizes.items():
        prediction = np.asarray(PIL.Image.open(outputs / (name[:-4] + ".png")))
        assert prediction.shape == (*size, 3)
        assert {tuple(c) for c in prediction.reshape(-1, 3)} <= palette


def test_oracle_stage_trains_on_the_target_fine_labels(tmp_path_factory):
    """stage='oracle': the target's train split is the source, with its fine labels; the
    source-only step runs and only the student is evaluated."""
    config = tiny_config("synthetic_oracle", tmp_path_factory.getbasetemp())
    config.num_steps = config.eval.every_steps = config.checkpoint_every_steps = 1
    data = sources.open_datasets(config)
    assert data.source is data.target
    record = data.source[0]
    assert "label" in record and "coarse_label" in record  # A target record.
    workdir = tmp_path_factory.mktemp("oracle") / "run"
    report = train.train_and_evaluate(config, str(workdir))
    assert set(report) == {"step", "settings", "student"}
    assert 0.0 <= report["student"]["miou"] <= 1.0
    (line,) = tiny_runs.train_lines(workdir)
    assert set(line) >= {"seg_s", "edge_s"} and "seg_mix" not in line


def test_fresh_run_traces_the_state_initialisation_once(tmp_path, monkeypatch):
    """train.initial_state with nothing to restore: the abstract state (the restore
    target) and the state itself come from one trace of the initialisation."""
    traces = []
    init_state = train_state._init_state
    monkeypatch.setattr(
        train_state, "_init_state", lambda *a, **k: traces.append(1) or init_state(*a, **k)
    )
    config = conftest.tiny_config()
    model, optimizer = conftest.tiny_model(config), optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    with checkpointing.make_manager(str(tmp_path), config) as manager:
        state, step = train.initial_state(config, model, optimizer, mesh, manager, None)
    assert step == 0 and int(state.step) == 0
    assert len(traces) == 1


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"init.init_from": "missing"}, "init_from='.*missing': no such checkpoint directory"),
        ({"init.init_from": "empty"}, "init_from='.*empty': no checkpoint in .*empty$"),
        ({"init.imagenet": "missing.pth"}, "config.init.imagenet='.*missing.pth': no such file$"),
        ({"init.imagenet": "weights.txt"}, "imagenet='.*weights.txt': expected a .npz or .pth"),
        ({"loss.imnet_fd": 0.005}, "imnet_fd=0.005 needs the ImageNet weights"),
    ],
    ids=["init_from_missing", "init_from_empty", "imagenet_missing", "imagenet_txt", "fd"],
)
def test_bad_start_fails_before_the_state_is_made(tmp_path, monkeypatch, overrides, expected):
    """A fresh run with a wrong config.init path, or a feature distance without ImageNet
    weights, stops before the initialiser compiles and runs (minutes for a large model
    on a CPU): only its abstract trace happened."""
    calls = []
    initializer = train_state.state_initializer

    def counting_initializer(*args, **kwargs):
        init = initializer(*args, **kwargs)
        return lambda key: calls.append(1) or init(key)

    monkeypatch.setattr(train_state, "state_initializer", counting_initializer)
    (tmp_path / "weights.txt").write_text("")
    (tmp_path / "empty").mkdir()
    config = conftest.tiny_config()
    config.update_from_flattened_dict(
        {k: str(tmp_path / v) if isinstance(v, str) else v for k, v in overrides.items()}
    )
    model, optimizer = conftest.tiny_model(config), optim.make_optimizer(config)
    mesh = parallel.make_mesh(jax.devices()[:1])
    with checkpointing.make_manager(str(tmp_path / "w"), config) as manager:
        with pytest.raises(ValueError, match=expected):
            train.initial_state(config, model, optimizer, mesh, manager, None)
    assert len(calls) == 1  # jax.eval_shape's, for the restore target.


def test_imagenet_weights_that_nothing_reads_are_named_not_checked(tmp_path, caplog):
    """With init_from and no feature distance the ImageNet file is not read: a warning
    says so, and its absence is no error. With the feature distance it is read."""
    (tmp_path / "stage1" / "4").mkdir(parents=True)
    config = conftest.tiny_config()
    config.init.init_from = str(tmp_path / "stage1")
    config.init.imagenet = str(tmp_path / "missing.pth")
    with caplog.at_level(logging.WARNING):
        train._check_fresh_start(config)
    assert f"config.init.imagenet='{tmp_path / 'missing.pth'}' is not read" in caplog.text
    config.loss.imnet_fd = 0.005
    with pytest.raises(ValueError, match="missing.pth': no such file"):
        train._check_fresh_start(config)


def test_from_imagenet_sets_student_and_teacher_backbones(tmp_path):
    """train._from_imagenet: both backbones get the converted torchvision weights (the
    teacher in its own buffers: the step donates the state), the head stays as it was."""
    config = config_lib.base_config()
    config.num_classes = 3
    config.model.update(depth=18, stage_sizes=(1, 1, 1, 1), width=WIDTH, proj_dim=8)
    config.model.aspp_dilations = (1, 2)
    config.data.crop_size = (32, 32)
    model = deeplab.build_model(config, bn_axis_name=parallel.AXIS)
    mesh = parallel.make_mesh(jax.devices()[:1])
    state = train_state.create_train_state(
        config, model, jax.random.PRNGKey(0), optimizer=optim.make_optimizer(config), mesh=mesh
    )
    weights = random_state_dict(18, (1, 1, 1, 1), seed=3)
    path = str(tmp_path / "resnet18.npz")
    np.savez(path, **weights)
    new = train._from_imagenet(state, path, mesh, "deeplabv2")
    expected_kernel = weights["conv1.weight"].transpose(2, 3, 1, 0)
    expected_var = weights["layer2.0.downsample.1.running_var"]
    for params, stats in (
        (new.params, new.batch_stats),
        (new.teacher_params, new.teacher_batch_stats),
    ):
        np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"], expected_kernel)
        np.testing.assert_array_equal(
            stats["backbone"]["layer2_0"]["downsample_bn"]["var"], expected_var
        )
    student = new.params["backbone"]["conv1"]["kernel"]
    teacher = new.teacher_params["backbone"]["conv1"]["kernel"]
    assert student.unsafe_buffer_pointer() != teacher.unsafe_buffer_pointer()
    jax.tree.map(np.testing.assert_array_equal, new.params["head"], state.params["head"])
    # The feature distance's frozen encoder: the ImageNet backbone, whether the student
    # just got it (no init_from) or came from a stage-1 checkpoint (the file is read).
    config.loss.imnet_fd, config.init.imagenet = 0.005, path
    for init_from, start in (("", new), ("a_stage_1_run", state)):
        config.init.init_from = init_from
        frozen = train._with_frozen_encoder(config, start, mesh).imnet_encoder
        np.testing.assert_array_equal(
            frozen["params"]["backbone"]["conv1"]["kernel"], expected_kernel
        )
        np.testing.assert_array_equal(
            frozen["batch_stats"]["backbone"]["layer2_0"]["downsample_bn"]["var"], expected_var
        )
    del weights["conv1.weight"]
    np.savez(path, **weights)
    with pytest.raises(ValueError, match="config.init.imagenet=.*conv1.weight"):
        train._from_imagenet(state, path, mesh, "deeplabv2")
