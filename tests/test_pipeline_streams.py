"""Stage 1 and the oracle build no target stream; labels travel as uint8."""

import numpy as np
import pytest
from conftest import CountingRecords
from pipeline_records import SOURCE, TARGET, pipeline_config

from wsda_jax.data import pipeline


@pytest.mark.parametrize("stage", ["source_only", "oracle"])
def test_non_adapt_stages_read_no_target(stage):
    config = pipeline_config(augment=True)
    config.stage = stage
    source, target = CountingRecords(SOURCE), CountingRecords(TARGET)
    iterator = pipeline.make_train_iterator(config, source, target)
    batches = [next(iterator) for _ in range(3)]
    assert target.reads == 0 and source.reads >= 6
    for batch in batches:
        assert set(batch) == {"source"}
        assert batch["source"]["label"].dtype == np.uint8
        assert batch["source"]["image"].shape == (2, 24, 40, 3)


def test_adapt_reads_both_streams_with_uint8_labels():
    config = pipeline_config(augment=True)
    source, target = CountingRecords(SOURCE), CountingRecords(TARGET)
    batch = next(pipeline.make_train_iterator(config, source, target))
    assert source.reads >= 2 and target.reads >= 2
    for domain, key in (("source", "label"), ("target", "weak_label"), ("target", "label")):
        assert batch[domain][key].dtype == np.uint8, (domain, key)
    assert set(np.unique(batch["target"]["weak_label"])) <= {1, 255}
