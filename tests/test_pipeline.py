"""Tests of the grain training and evaluation pipelines on tiny in-memory records."""

import io
import time

import numpy as np
import pytest
from conftest import CountingRecords
from pipeline_records import (
    SOURCE,
    TARGET,
    C,
    H,
    W,
    assert_batches_equal,
    make_records,
    pipeline_config,
    take,
)

from wsda_jax.data import eval_pipeline, pipeline, records


def test_train_batch_shapes_and_dtypes():
    iterator = pipeline.make_train_iterator(pipeline_config(augment=True), SOURCE, TARGET)
    batch = next(iterator)
    assert set(batch) == {"source", "target"}
    assert set(batch["source"]) == {"image", "label"}
    assert set(batch["target"]) == {"image", "weak_label", "presence", "label"}
    assert batch["source"]["image"].dtype == np.uint8
    assert batch["source"]["image"].shape == (2, 24, 40, 3)
    assert batch["source"]["label"].dtype == np.uint8  # uint8 to the device; the steps cast
    assert batch["source"]["label"].shape == (2, 24, 40)
    assert batch["target"]["image"].shape == (2, 24, 40, 3)
    for key in ("weak_label", "label"):
        assert batch["target"][key].dtype == np.uint8
        assert batch["target"][key].shape == (2, 24, 40)
    assert batch["target"]["presence"].dtype == np.float32
    assert batch["target"]["presence"].shape == (2, C)
    assert set(np.unique(batch["source"]["label"])) <= {3, 255}
    assert set(np.unique(batch["target"]["weak_label"])) <= {1, 255}


def test_same_seed_same_batches_other_seed_differs():
    a = take(pipeline.make_train_iterator(pipeline_config(augment=True), SOURCE, TARGET), 3)
    b = take(pipeline.make_train_iterator(pipeline_config(augment=True), SOURCE, TARGET), 3)
    assert_batches_equal(a, b)
    c = take(pipeline.make_train_iterator(pipeline_config(augment=True, seed=1), SOURCE, TARGET), 3)
    assert any(
        not np.array_equal(x["target"]["image"], y["target"]["image"])
        for x, y in zip(a, c, strict=True)
    )


def test_epochs_are_reshuffled_and_cover_the_data():
    iterator = pipeline.make_train_iterator(pipeline_config(batch_size=1), SOURCE, TARGET)
    ids = [int(b["source"]["image"][0, 0, 0, 0]) - 1 for b in take(iterator, 15)]
    epochs = [ids[0:5], ids[5:10], ids[10:15]]
    assert all(sorted(e) == list(range(5)) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


@pytest.mark.parametrize("num_workers", [0, 1])
def test_restored_state_replays_the_next_batches(num_workers):
    start = time.perf_counter()
    config = pipeline_config(augment=True, num_workers=num_workers)
    iterator = pipeline.make_train_iterator(config, SOURCE, TARGET)
    take(iterator, 2)
    state = iterator.get_state()
    expected = take(iterator, 3)
    restored = pipeline.make_train_iterator(config, SOURCE, TARGET)
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected)
    if num_workers:
        iterator.close()
        restored.close()
    assert time.perf_counter() - start < 30


def test_batches_and_state_do_not_depend_on_the_worker_count():
    """Batch k is the same examples read by 0 or 2 worker processes, and a state saved
    with 2 workers resumes with none (a new host with other cores) at the same batch."""
    config = pipeline_config(augment=True)
    expected = take(pipeline.make_train_iterator(config, SOURCE, TARGET), 6)
    config.data.num_workers = 2
    iterator = pipeline.make_train_iterator(config, SOURCE, TARGET)
    try:
        assert_batches_equal(take(iterator, 3), expected[:3])
        state = iterator.get_state()
    finally:
        iterator.close()
    config.data.num_workers = 0
    restored = pipeline.make_train_iterator(config, SOURCE, TARGET)
    restored.set_state(state)
    assert_batches_equal(take(restored, 3), expected[3:])


def test_saved_iterator_states_resume_at_their_batch():
    """The state holds the batch index and size; a garbled state is refused."""
    assert pipeline.batches_consumed({"batches": 7, "batch_size": 4}, 4) == 7
    # Another host batch (other local devices): from the first example not yet read.
    assert pipeline.batches_consumed({"batches": 3, "batch_size": 8}, 2) == 12
    with pytest.raises(ValueError, match="unknown data-iterator state"):
        pipeline.batches_consumed({"next_index": 12}, 4)
    with pytest.raises(ValueError, match="unknown data-iterator state"):
        pipeline.batches_consumed({"position": 3}, 4)


def test_orbax_checkpoint_of_the_iterator(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    import grain

    config = pipeline_config(augment=True)
    iterator = pipeline.make_train_iterator(config, SOURCE, TARGET)
    take(iterator, 2)
    with ocp.CheckpointManager(tmp_path) as manager:
        manager.save(2, args=ocp.args.Composite(it=grain.checkpoint.CheckpointSave(iterator)))
        manager.wait_until_finished()
        expected = take(iterator, 2)
        restored = pipeline.make_train_iterator(config, SOURCE, TARGET)
        manager.restore(2, args=ocp.args.Composite(it=grain.checkpoint.CheckpointRestore(restored)))
    assert_batches_equal(take(restored, 2), expected)


def test_two_hosts_get_disjoint_shards_covering_the_data():
    config = pipeline_config(batch_size=1)  # 1 image per host (one device each) and domain
    seen = {"source": [], "target": []}
    for process_index in range(2):
        iterator = pipeline.make_train_iterator(
            config, SOURCE, TARGET, process_index=process_index, process_count=2
        )
        shard = {"source": len(SOURCE[process_index::2]), "target": len(TARGET[process_index::2])}
        batches = take(iterator, max(shard.values()))
        for domain, records_in_shard in shard.items():
            ids = [int(b[domain]["image"][0, 0, 0, 0]) - 1 for b in batches[:records_in_shard]]
            assert len(set(ids)) == records_in_shard  # one epoch of this host's shard
            seen[domain].append(set(ids))
    for domain, first in (("source", 0), ("target", 100)):
        host0, host1 = seen[domain]
        assert not host0 & host1
        assert host0 | host1 == set(range(first, first + len(SOURCE if first == 0 else TARGET)))


def test_host_batch_is_per_device_size_times_local_devices():
    iterator = pipeline.make_train_iterator(
        pipeline_config(batch_size=3), SOURCE, TARGET, process_count=2, num_local_devices=2
    )
    batch = next(iterator)
    assert batch["source"]["image"].shape[0] == 6
    assert batch["target"]["weak_label"].shape[0] == 6
    evaluated = next(
        eval_pipeline.make_eval_iterator(pipeline_config(), SOURCE, num_local_devices=3)
    )
    assert evaluated["image"].shape[0] == 6  # eval.per_device_batch_size=2 x 3 devices.


@pytest.mark.parametrize(
    "weak_label,presence,expected",
    [
        ("coarse", "crop", {1, 255}),
        ("point", "crop", {2, 255}),
        # Image labels carry the gtCoarse crop, from which the step takes the presence...
        ("image", "crop", {1, 255}),
        # ...unless the presence is the whole image's: then no map travels.
        ("image", "image", {255}),
    ],
)
def test_weak_label_selection(weak_label, presence, expected):
    config = pipeline_config(weak_label=weak_label)
    config.presence = presence
    batch = next(pipeline.make_train_iterator(config, SOURCE, TARGET))
    weak = batch["target"]["weak_label"]
    assert set(np.unique(weak)) == expected
    if expected == {1, 255}:
        assert (weak[:, :, : W // 2] == 1).all() and (weak[:, :, W // 2 :] == 255).all()
    if weak_label == "point":
        assert (weak[:, 5, 7] == 2).all() and (weak == 2).sum() == weak.shape[0]
    np.testing.assert_array_equal(batch["target"]["label"], 3)
    ids = batch["target"]["image"][:, 0, 0, 0].astype(int) - 1
    expected_presence = np.stack([(np.arange(C) % 3 == i % 3) for i in ids]).astype(np.float32)
    np.testing.assert_array_equal(batch["target"]["presence"], expected_presence)


def test_target_without_fine_label_gets_ignore():
    target = [dict(r) for r in TARGET]
    for record in target:
        del record["label"]
    batch = next(pipeline.make_train_iterator(pipeline_config(weak_label="none"), SOURCE, target))
    assert (batch["target"]["label"] == 255).all()
    assert (batch["target"]["weak_label"] == 255).all()


@pytest.mark.parametrize("num_records", [5, 4, 1])
def test_eval_covers_every_record_once_across_hosts(num_records):
    config = pipeline_config()
    evaluated = []
    num_batches = []
    for process_index in range(2):
        batches = list(
            eval_pipeline.make_eval_iterator(
                config, SOURCE[:num_records], process_index=process_index, process_count=2
            )
        )
        num_batches.append(len(batches))
        for batch in batches:
            assert batch["image"].dtype == np.uint8 and batch["image"].shape == (2, H, W, 3)
            assert batch["label"].dtype == np.int32 and batch["mask"].dtype == bool
            assert batch["index"].dtype == np.int32
            for i in range(2):
                if batch["mask"][i]:
                    assert batch["image"][i, 0, 0, 0] == batch["index"][i] + 1
                    assert (batch["label"][i] == 3).all()
                    evaluated.append(int(batch["index"][i]))
                else:
                    assert batch["index"][i] == -1 and (batch["label"][i] == 255).all()
    assert num_batches[0] == num_batches[1]  # hosts stay in lockstep
    assert sorted(evaluated) == list(range(num_records))


def test_eval_resize_and_max_images():
    config = pipeline_config()
    config.data.eval_resize = (16, 24)
    config.eval.max_images = 3
    batches = list(eval_pipeline.make_eval_iterator(config, SOURCE))
    assert len(batches) == 2
    assert batches[0]["image"].shape == (2, 16, 24, 3) and batches[0]["label"].shape == (2, 16, 24)
    assert batches[1]["mask"].tolist() == [True, False]
    assert [int(i) for b in batches for i in b["index"]] == [0, 1, 2, -1]


def test_eval_padding_decodes_record_zero_once():
    """One record in a batch of 8: the seven padding entries repeat record 0's image
    (label 255, mask False) from one decode, not seven."""
    config = pipeline_config()
    config.eval.per_device_batch_size = 8
    counting = CountingRecords(SOURCE[:1])
    (batch,) = list(eval_pipeline.make_eval_iterator(config, counting))
    assert counting.reads == 2  # The record itself and the padding image.
    assert batch["mask"].tolist() == [True] + [False] * 7
    assert batch["index"].tolist() == [0] + [-1] * 7
    assert (batch["image"] == batch["image"][:1]).all()
    assert (batch["label"][1:] == 255).all() and (batch["label"][0] == 3).all()


def test_npy_records_give_the_same_batches_as_png():
    """The image format is lossless and changes no random draw: bit-equal batches."""
    config = pipeline_config(augment=True)
    batches = {}
    for image_format in ("png", "npy"):
        source = make_records(5, target=False, image_format=image_format, noise=True)
        target = make_records(7, target=True, first=100, image_format=image_format, noise=True)
        batches[image_format] = take(pipeline.make_train_iterator(config, source, target), 3)
    for png, npy in zip(batches["png"], batches["npy"], strict=True):
        for domain in ("source", "target"):
            for key, value in png[domain].items():
                np.testing.assert_array_equal(npy[domain][key], value)
                assert npy[domain][key].dtype == value.dtype


def test_npy_image_round_trip_and_a_bad_array_is_refused():
    image = np.random.default_rng(0).integers(0, 256, (5, 7, 3), np.uint8)
    data = records.encode_npy(image)
    assert data.startswith(records.NPY_SIGNATURE)
    np.testing.assert_array_equal(records.decode_image(data), image)
    np.testing.assert_array_equal(records.decode_image(records.encode_png(image)), image)
    buffer = io.BytesIO()
    np.save(buffer, image.astype(np.float32))
    with pytest.raises(ValueError, match="expected a uint8"):
        records.decode_image(buffer.getvalue())
    with pytest.raises(ValueError, match="bytes for a 5x7x3 image"):
        records.decode_image(data[:-1])  # A cut-short record.
    with pytest.raises(ValueError, match="image_format"):
        records.encode_example({"image": image}, "jpeg")


def test_batches_are_not_colour_jittered_on_the_host():
    """The colour jitter runs in the train step: with identity geometry a batch holds the
    records' exact pixels although config.data.jitter > 0."""
    config = pipeline_config()
    assert config.data.jitter > 0
    source = make_records(5, target=False, noise=True)
    batch = next(pipeline.make_train_iterator(config, source, TARGET))
    images = {records.decode_example(r)["image"].tobytes() for r in source}
    assert all(image.tobytes() in images for image in batch["source"]["image"])


@pytest.mark.parametrize(
    "cores, devices, expected", [(2, 1, 0), (3, 8, 0), (4, 1, 2), (16, 1, 3), (96, 8, 24)]
)
def test_automatic_worker_count(monkeypatch, cores, devices, expected):
    config = pipeline_config()
    config.data.num_workers = -1
    monkeypatch.setattr(pipeline.base, "available_cores", lambda: cores)
    assert pipeline.num_workers(config.data, devices) == expected
    config.data.num_workers = 1  # An explicit count is kept.
    assert pipeline.num_workers(config.data, devices) == 1
