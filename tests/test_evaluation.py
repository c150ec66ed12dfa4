"""Whole-split evaluation: batched predictions, calls of several batches, the result record."""

import itertools

import jax
import numpy as np
import pytest

from affect_jax import evaluation, steps
from affect_jax.data import pipeline
from tests.conftest import bit_identical, tiny_config, tiny_run


@pytest.mark.parametrize("name", ["vgg16", "resnet50"])
def test_several_eval_batches_per_call_match_one_per_call(name):
    """predict_split with make_eval_steps' lax.map gives the per-batch calls' predictions.

    7 batches of 3 in calls of 3 (the last call takes one), the last batch padded: the padding
    rows are dropped either way. Bit-identical with oneDNN's convolutions; float32 round-off with
    XLA's (the loop body's fusions may differ).
    """
    config, mesh, (graphdef, _, state), splits = tiny_run(name)
    batches = list(itertools.islice(pipeline.eval_batches(splits.validation, config, 3), 7))
    assert len(batches) == 7
    # The last one padded, as eval_batches pads a split's last batch.
    batches[-1] = dict(batches[-1], mask=np.array([1, 0, 0], np.float32))
    eval_steps = jax.jit(steps.make_eval_steps(steps.make_eval_step(graphdef)))
    one = evaluation.predict_split(eval_steps, state, batches, mesh)
    three = evaluation.predict_split(eval_steps, state, batches, mesh, batches_per_call=3)
    assert len(one["probs"]) == 6 * 3 + 1
    assert set(one) == set(three)
    for key, value in one.items():
        if bit_identical(config):
            np.testing.assert_array_equal(three[key], value, err_msg=key)
        else:
            np.testing.assert_allclose(three[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
    # The labels come back in the batches' order.
    np.testing.assert_array_equal(
        one["expression"], np.concatenate([b["expression"][b["mask"] > 0] for b in batches])
    )
    with pytest.raises(ValueError, match="batches_per_call=0"):
        evaluation.predict_split(eval_steps, state, batches, mesh, batches_per_call=0)


@pytest.mark.parametrize(
    ("steps_per_call", "batch", "eval_batch", "expected"),
    [(8, 32, 64, 4), (8, 32, 32, 8), (1, 32, 64, 1), (8, 32, 512, 1), (3, 16, 20, 2)],
)
def test_evaluation_calls_hold_a_training_calls_images(steps_per_call, batch, eval_batch, expected):
    config = tiny_config(
        steps_per_execution=steps_per_call, batch_size=batch, eval_batch_size=eval_batch
    )
    assert evaluation.eval_batches_per_call(config) == expected


def test_result_record_names_what_was_scored(tiny):
    source = pipeline.make_splits(tiny).source
    record = evaluation.result_record(
        tiny, source, {"accuracy": 0.5}, 24, checkpoint="best", epoch=3, split="test"
    )
    assert list(record) == [
        "model",
        "num_classes",
        "class_names",
        "data_source",
        "checkpoint",
        "epoch",
        "split",
        "num_examples",
        "metrics",
    ]
    assert record["model"] == "vgg16" and record["data_source"] == "synthetic"
    assert record["num_classes"] == 8 and record["class_names"] == list(source.class_names)
    assert record["num_examples"] == 24 and record["metrics"] == {"accuracy": 0.5}
