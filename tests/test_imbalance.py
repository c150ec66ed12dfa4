"""Class imbalance: loss weights from class counts, class-balanced epochs in the input
pipeline."""

import json

import numpy as np
import pytest

from affect_jax import imbalance
from affect_jax.data import pipeline
from affect_jax.data.source import ExamplePool, decode_raw_image
from tests.conftest import tiny_config

COUNTS = np.array([900, 60, 30, 10])


def test_inverse_frequency_weights():
    w = imbalance.class_weights(COUNTS, "inverse_frequency")
    np.testing.assert_allclose(w, COUNTS.sum() / (len(COUNTS) * COUNTS), rtol=1e-6)  # sklearn
    assert (w * COUNTS).sum() == pytest.approx(COUNTS.sum())  # average example weight 1
    np.testing.assert_allclose(w * COUNTS, (w * COUNTS)[0], rtol=1e-6)  # classes weigh equally


def test_effective_number_weights():
    beta = 0.99
    w = imbalance.class_weights(COUNTS, "effective_number", beta)
    raw = (1 - beta) / (1 - beta**COUNTS)
    np.testing.assert_allclose(w / w[0], raw / raw[0], rtol=1e-5)  # Cui et al.'s ratios
    assert (w * COUNTS).sum() == pytest.approx(COUNTS.sum())
    np.testing.assert_array_equal(
        imbalance.class_weights(COUNTS, "effective_number", 0.0), np.ones(4)
    )  # beta 0: no re-weighting
    # beta -> 1: inverse frequency.
    np.testing.assert_allclose(
        imbalance.class_weights(COUNTS, "effective_number", 1 - 1e-9),
        imbalance.class_weights(COUNTS, "inverse_frequency"),
        rtol=1e-3,
    )


def test_weights_of_absent_classes_and_none():
    np.testing.assert_array_equal(imbalance.class_weights(COUNTS, "none"), np.ones(4))
    w = imbalance.class_weights([10, 0, 30], "inverse_frequency")
    assert w[1] == 0 and w[0] == pytest.approx(3 * w[2])


def test_balanced_order_draws_classes_equally_and_is_seeded():
    labels = np.repeat(np.arange(4), COUNTS)
    order = imbalance.balanced_order(labels, seed=0, epoch=0)
    assert len(order) == len(labels)
    per_class = np.bincount(labels[order], minlength=4)
    assert per_class.max() - per_class.min() <= 1 and per_class.sum() == 1000
    # The rarest class's 10 examples each appear 25 times; the most frequent shows 250 of 900,
    # each at most once.
    np.testing.assert_array_equal(np.bincount(order[labels[order] == 3]), [0] * 990 + [25] * 10)
    assert np.bincount(order[labels[order] == 0]).max() == 1
    np.testing.assert_array_equal(order, imbalance.balanced_order(labels, seed=0, epoch=0))
    assert not np.array_equal(order, imbalance.balanced_order(labels, seed=0, epoch=1))
    assert not np.array_equal(order, imbalance.balanced_order(labels, seed=1, epoch=0))


def _pool(labels):
    n = len(labels)
    return ExamplePool(
        {
            "image": np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8),
            "expression": labels.astype(np.int32),
            "valence": np.zeros(n, np.float32),
            "arousal": np.zeros(n, np.float32),
            "id": np.arange(n),
        },
        decode_raw_image,
    )


def test_balanced_sampling_in_the_pipeline_is_deterministic_and_resumable():
    labels = np.repeat(np.arange(3), [40, 6, 2])
    pool = _pool(labels)
    config = tiny_config(**{"data.sampling": "balanced", "data.image_size": 8})

    def epoch(number, start_step=0):
        batches = list(
            pipeline.train_batches(
                pool, config, number, 8, start_step=start_step
            ).as_numpy_iterator()
        )
        return (
            np.concatenate([b["expression"] for b in batches]),
            np.concatenate([b["image"] for b in batches]),
        )

    labels_read, images = epoch(0)
    assert len(labels_read) == 48  # The epoch keeps the training split's length: 6 batches.
    np.testing.assert_array_equal(np.bincount(labels_read), [16, 16, 16])
    np.testing.assert_array_equal(images, epoch(0)[1])
    np.testing.assert_array_equal(images[16:], epoch(0, start_step=2)[1])  # resumed at step 2
    assert not np.array_equal(images, epoch(1)[1])
    shuffled = tiny_config(**{"data.image_size": 8})
    batches = pipeline.train_batches(pool, shuffled, 0, 8).as_numpy_iterator()
    np.testing.assert_array_equal(
        np.bincount(np.concatenate([b["expression"] for b in batches])), [40, 6, 2]
    )


def test_class_balance_file(tmp_path):
    w = imbalance.class_weights(COUNTS, "effective_number", 0.9)
    path = imbalance.write_class_balance(
        str(tmp_path), ["a", "b", "c", "d"], COUNTS, w, "effective_number", 0.9, "shuffle", 1000
    )
    record = json.loads(open(path).read())
    assert record["train_counts"] == {"a": 900, "b": 60, "c": 30, "d": 10}
    assert record["class_weights"]["d"] == pytest.approx(float(w[3]))
    assert record["effective_number_beta"] == 0.9 and record["epoch_length"] == 1000


def test_synthetic_class_fractions_make_an_imbalanced_pool():
    from affect_jax.data import synthetic

    config = tiny_config(**{"data.synthetic_size": 160})
    config.data.synthetic_class_fractions = (1, 1, 0.5, 0.25, 1, 1, 1, 0.1)
    source = synthetic.load_source(config)
    np.testing.assert_array_equal(
        np.bincount(source.pools["train"].labels), [20, 20, 10, 5, 20, 20, 20, 2]
    )
    assert source.counts["kept"] == 117 and len(source.pools["test"]) == 32
    config.data.synthetic_class_fractions = (1, 0)
    with pytest.raises(ValueError, match="synthetic_class_fractions=\\(1, 0\\); expected 8"):
        synthetic.load_source(config)


def test_weighted_run_ranks_checkpoints_by_balanced_accuracy(tmp_path):
    from affect_jax import train

    config = tiny_config(
        **{
            "loss_weights.class_weighting": "effective_number",
            "loss_weights.effective_number_beta": 0.9,
            "best_metric": "balanced_accuracy",
            "num_epochs": 3,
        }
    )
    config.data.synthetic_class_fractions = (1, 1, 0.5, 0.5, 0.3, 0.3, 0.3, 0.2)
    final = train.train_and_evaluate(config, str(tmp_path))
    balance = json.loads((tmp_path / imbalance.CLASS_BALANCE_FILE).read_text())
    assert balance["class_weighting"] == "effective_number"
    counts = np.array(list(balance["train_counts"].values()))
    weights = np.array(list(balance["class_weights"].values()))
    assert counts[0] > counts[-1] and weights[0] < weights[-1]
    assert (counts * weights).sum() == pytest.approx(counts.sum(), rel=1e-5)
    history = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    balanced = [r["val_balanced_accuracy"] for r in history]
    assert balanced[final["best_epoch"] - 1] == max(balanced)
    assert final["metrics"]["balanced_accuracy"] == pytest.approx(max(balanced))
