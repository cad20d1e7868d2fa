"""Shared tiny configurations, models and batches for the step tests (CPU-sized), the JAX
settings of the test process, the session's one CLI training run, and how the tests are
grouped and ordered for two xdist workers."""

import threading

import jax
import numpy as np
import pytest
import subprocesses

from wsda_jax import config_presets, cpu_flags
from wsda_jax.models import deeplab

# The tests' nets are tiny: XLA's optimisation passes cost more than they save. Set once
# for the whole test process, before JAX initialises its backend (subprocesses get the
# same settings from subprocesses.jax_env).
jax.config.update("jax_disable_most_optimizations", True)
cpu_flags.apply_cpu_defaults(subprocesses.FAST_COMPILE_FLAGS)  # Appended to XLA_FLAGS.

# Test modules that share the session's CLI run (`tiny_cli_run`): one xdist worker runs
# them all, so the run is made once (and its programs are in that worker's compilation
# cache: the device check's dry run trains the same synthetic program).
CLI_MODULES = ("test_main", "test_faults", "test_resume", "test_device_check")


@pytest.hookimpl(tryfirst=True)  # Before pytest-xdist's worker hook reads the groups.
def pytest_collection_modifyitems(items):
    """Groups the tests for pytest-xdist (`--dist loadgroup`: a group runs on one worker,
    so module fixtures are built once) and orders them longest first: the full-size
    rehearsal, then the other `slow` groups (fresh processes), then the rest in file
    order; with two workers that keeps both busy to the end. It must run before
    pytest-xdist's own hook, which turns the groups into node ids: after it, every test
    would be a unit of its own and each worker would build the module fixtures again."""

    def group(item):
        module = item.path.stem
        return "cli" if module in CLI_MODULES else module

    def rank(item):
        if item.path.stem == "test_rehearsal":
            return 0
        return 1 if item.get_closest_marker("slow") else 2

    for item in items:
        item.add_marker(pytest.mark.xdist_group(group(item)))
    items.sort(key=rank)  # Stable: file order within a rank.


NUM_CLASSES = 5
IMAGE_SIZE = 32


def tiny_config(weak_label: str = "coarse", batch_size: int = 2):
    """`config_presets.tiny_step`: ResNet-18 (one block per stage, width 4), 5 classes,
    32x32 crops, all terms on."""
    config = config_presets.tiny_step(weak_label, batch_size)
    assert config.num_classes == NUM_CLASSES and config.data.crop_size == (IMAGE_SIZE,) * 2
    return config


def tiny_model(config, bn_axis_name="data"):
    return deeplab.build_model(config, bn_axis_name=bn_axis_name)


def synthetic_batch(seed: int, batch_size: int, weak_label: str, size: int = IMAGE_SIZE):
    """A learnable numpy train batch: label = a blocky class map, colour encodes the class."""
    rng = np.random.default_rng(seed)

    def scene():
        coarse = rng.integers(0, NUM_CLASSES, (batch_size, size // 8, size // 8))
        label = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2).astype(np.int32)
        colours = rng.integers(0, 256, (NUM_CLASSES, 3))
        image = colours[label] + rng.integers(-20, 20, label.shape + (3,))
        return np.clip(image, 0, 255).astype(np.uint8), label

    source_image, source_label = scene()
    target_image, target_label = scene()
    if weak_label == "coarse":
        weak = np.where(rng.random(target_label.shape) < 0.5, target_label, 255)
        weak[:, :, : size // 2] = 255
    elif weak_label == "point":
        weak = np.full_like(target_label, 255)
        weak[:, 3::8, 5::8] = target_label[:, 3::8, 5::8]
    else:
        weak = np.full_like(target_label, 255)
    presence = np.zeros((batch_size, NUM_CLASSES), np.float32)
    for b in range(batch_size):
        presence[b, np.unique(target_label[b])] = 1.0
    return {
        "source": {"image": source_image, "label": source_label},
        "target": {
            "image": target_image,
            "weak_label": weak.astype(np.int32),
            "presence": presence,
            "label": target_label,
        },
    }


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """The test process compiles through the persistent compilation cache that its
    subprocesses use (`subprocesses.jax_env`): a program compiled once, here or in a CLI
    run, is read back wherever it recurs. Set before the session's first compile."""
    cache_dir = subprocesses.compilation_cache_dir(tmp_path_factory.getbasetemp())
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)


@pytest.fixture(scope="session")
def tiny_cli_run(tmp_path_factory):
    """The workdir of one `python -m wsda_jax.main` run of configs/synthetic_coarse.py:tiny
    (4 steps, checkpoints 2 and 4, evaluation at step 4), shared by the CLI tests
    (test_main, test_faults, test_resume). Read-only: a test that changes a workdir works
    on `subprocesses.copy_workdir` of it."""
    base = tmp_path_factory.getbasetemp()
    workdir = tmp_path_factory.mktemp("tiny_cli") / "run"
    result = subprocesses.run_main(base, subprocesses.TINY, f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.fixture(scope="session")
def single_device_mesh():
    return jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))


class CountingRecords:
    """A record sequence that counts reads (grain reads from several threads)."""

    def __init__(self, items):
        self.items, self.reads, self.lock = items, 0, threading.Lock()

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        with self.lock:
            self.reads += 1
        return self.items[index]
