"""compute_metrics against scikit-learn / SciPy / independent NumPy formulas."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import scipy.stats
from sklearn import metrics as skm

from affect_jax.metrics import MetricWarning, ccc, compute_metrics, sagr

NAMES8 = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
TOL = 1e-9


def close(actual, expected):
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL)


def messages(record):
    return " | ".join(str(w.message) for w in record)


def ccc_ref(y, p):
    """CCC written differently: from np.cov's population (bias=True) covariance matrix."""
    c = np.cov(y, p, bias=True)
    return 2 * c[0, 1] / (c[0, 0] + c[1, 1] + (np.mean(y) - np.mean(p)) ** 2)


def sagr_ref(y, p):
    return sum(
        (a > 0 and b > 0) or (a < 0 and b < 0) or (a == 0 and b == 0)
        for a, b in zip(y, p, strict=True)
    ) / len(y)


def random_split(seed, n, num_classes):
    """Labels covering every class, Dirichlet probs, valence/arousal partly outside [-1, 1]."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - num_classes)])
    logits = rng.normal(size=(n, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    va_true = rng.uniform(-1, 1, size=(n, 2))
    va_pred = 0.7 * va_true + rng.normal(0, 0.4, size=(n, 2))
    return labels, probs, va_true, va_pred


def names(num_classes):
    return NAMES8[:num_classes] if num_classes <= 8 else [f"C{k}" for k in range(num_classes)]


def check_against_references(labels, probs, va_true, va_pred, class_names, m):
    """Every metric in m against an independent computation (inputs with all classes present)."""
    num_classes = probs.shape[1]
    preds = probs.argmax(axis=1)
    close(m["accuracy"], np.mean(preds == labels))
    close(m["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))
    close(
        m["balanced_accuracy"],
        np.mean([np.mean(preds[labels == k] == k) for k in range(num_classes)]),
    )
    close(m["kappa"], skm.cohen_kappa_score(labels, preds))
    if num_classes > 2:
        close(m["auc"], skm.roc_auc_score(labels, probs, multi_class="ovr", average="macro"))
    close(
        m["auc"], np.mean([skm.roc_auc_score(labels == k, probs[:, k]) for k in range(num_classes)])
    )
    close(
        m["pr_auc"],
        np.mean(
            [skm.average_precision_score(labels == k, probs[:, k]) for k in range(num_classes)]
        ),
    )
    close(m["f1_macro"], skm.f1_score(labels, preds, average="macro", zero_division=0))
    for k, name in enumerate(class_names):
        key = name.lower()
        tp = np.sum((preds == k) & (labels == k))
        close(m[f"recall_{key}"], tp / np.sum(labels == k))
        if np.any(preds == k):
            close(m[f"precision_{key}"], tp / np.sum(preds == k))
        close(m[f"f1_{key}"], 2 * tp / (np.sum(labels == k) + np.sum(preds == k)))
    cm = np.zeros((num_classes, num_classes), int)
    np.add.at(cm, (labels, preds), 1)
    assert m["confusion_matrix"] == cm.tolist()

    clipped = np.clip(va_pred, -1, 1)
    for d, dim in enumerate(("valence", "arousal")):
        y, p = va_true[:, d], clipped[:, d]
        close(m[f"{dim}_rmse"], np.sqrt(skm.mean_squared_error(y, p)))
        close(m[f"{dim}_corr"], scipy.stats.pearsonr(y, p).statistic)
        close(m[f"{dim}_sagr"], sagr_ref(y, p))
        close(m[f"{dim}_ccc"], ccc_ref(y, p))
    for metric in ("rmse", "corr", "sagr", "ccc"):
        close(m[f"mean_{metric}"], (m[f"valence_{metric}"] + m[f"arousal_{metric}"]) / 2)


@pytest.mark.parametrize("seed,n,num_classes", [(0, 400, 8), (1, 350, 7), (2, 60, 3), (3, 50, 2)])
def test_random_matches_references_without_warnings(seed, n, num_classes):
    labels, probs, va_true, va_pred = random_split(seed, n, num_classes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # A well-posed split must not warn at all.
        m = compute_metrics(labels, probs, va_true, va_pred, names(num_classes))
    check_against_references(labels, probs, va_true, va_pred, names(num_classes), m)


def test_output_is_flat_floats_plus_confusion_matrix():
    labels, probs, va_true, va_pred = random_split(4, 200, 8)
    m = compute_metrics(labels, probs, va_true, va_pred, NAMES8)
    assert list(m)[-1] == "confusion_matrix"
    cm = m.pop("confusion_matrix")
    assert all(type(v) is int for row in cm for v in row) and len(cm) == 8
    assert all(type(v) is float for v in m.values())
    for key in (
        "accuracy",
        "balanced_accuracy",
        "f1_macro",
        "auc",
        "pr_auc",
        "kappa",
        "precision_neutral",
        "recall_contempt",
        "f1_happy",
        "valence_ccc",
        "arousal_rmse",
        "mean_ccc",
        "mean_sagr",
        "mean_corr",
        "valence_sagr",
    ):
        assert key in m
    assert json.loads(json.dumps(m)) == m


def test_ties_in_probabilities_and_argmax():
    rng = np.random.default_rng(5)
    n, num_classes = 300, 4
    labels = np.concatenate([np.arange(num_classes), rng.integers(0, num_classes, n - 4)])
    # Coarse probabilities: many ties within each class column and exact argmax ties.
    raw = rng.integers(1, 4, size=(n, num_classes)).astype(float)
    probs = raw / raw.sum(axis=1, keepdims=True)
    va_true = np.round(rng.uniform(-1, 1, (n, 2)), 1)  # Ties and exact zeros.
    va_pred = np.round(rng.uniform(-1, 1, (n, 2)), 1)
    m = compute_metrics(labels, probs, va_true, va_pred, names(num_classes))
    check_against_references(labels, probs, va_true, va_pred, names(num_classes), m)
    with pytest.warns(MetricWarning):  # Class "a" is absent: AUC undefined.
        tied = compute_metrics([1], [[0.5, 0.5]], None, None, ("a", "b"))
    assert tied["confusion_matrix"] == [[0, 0], [1, 0]]  # A tie goes to the lowest index.


def test_float32_softmax_accepted():
    labels, probs, va_true, va_pred = random_split(6, 100, 8)
    m = compute_metrics(
        labels,
        probs.astype(np.float32),
        va_true.astype(np.float32),
        va_pred.astype(np.float32),
        NAMES8,
    )
    close(m["accuracy"], np.mean(probs.argmax(1) == labels))


def test_clipping_of_predictions():
    labels, probs, va_true, _ = random_split(7, 200, 8)
    rng = np.random.default_rng(7)
    va_pred = va_true * 1.8 + rng.normal(0, 0.2, va_true.shape)  # Often beyond [-1, 1].
    assert np.any(np.abs(va_pred) > 1)
    m = compute_metrics(labels, probs, va_true, va_pred, NAMES8)
    m_clipped = compute_metrics(labels, probs, va_true, np.clip(va_pred, -1, 1), NAMES8)
    for key in ("valence_rmse", "arousal_corr", "valence_ccc", "mean_sagr"):
        assert m[key] == m_clipped[key]
    y, p = va_true[:, 0], va_pred[:, 0]
    assert abs(m["valence_ccc"] - ccc_ref(y, p)) > 1e-3  # Unclipped would differ.
    close(m["valence_ccc"], ccc_ref(y, np.clip(p, -1, 1)))


def test_sagr_zero_matches_only_zero():
    y = np.array([0.0, 0.5, -0.5, 0.0, 0.3, -0.0])
    p = np.array([0.0, 0.0, -0.1, 0.2, 0.9, 0.0])
    # Matches: 0/0, -/-, +/+, -0/0 -> 4 of 6.
    close(sagr(y, p), 4 / 6)
    close(sagr(y, p), sagr_ref(y, p))


def va_metrics(y, p, **kwargs):
    """compute_metrics on a trivial classification part, for regression edge cases."""
    n = len(y)
    labels = np.arange(n) % 2
    probs = np.eye(2)[labels] * 0.8 + 0.1
    va = np.stack([y, y], axis=1)
    va_pred = np.stack([p, p], axis=1)
    return compute_metrics(labels, probs, va, va_pred, ("a", "b"))


def test_perfect_affine_and_anti_correlation():
    y = np.random.default_rng(8).uniform(-1, 1, 100)
    m = va_metrics(y, y)
    for key, value in (
        ("valence_corr", 1),
        ("valence_ccc", 1),
        ("valence_rmse", 0),
        ("valence_sagr", 1),
    ):
        close(m[key], value)
    m = va_metrics(y, 0.5 * y + 0.1)
    close(m["valence_corr"], 1)
    close(m["valence_ccc"], ccc_ref(y, 0.5 * y + 0.1))
    assert m["valence_ccc"] < 1
    m = va_metrics(y, -y)
    close(m["valence_corr"], -1)
    close(m["valence_ccc"], ccc_ref(y, -y))
    close(m["arousal_ccc"], ccc(y, -y))


def test_constant_prediction_corr_nan_ccc_zero():
    y = np.random.default_rng(9).uniform(-1, 1, 50)
    p = np.full(50, 0.2)
    with pytest.warns(MetricWarning) as record:
        m = va_metrics(y, p)
    assert "valence correlation is undefined" in messages(record)
    assert np.isnan(m["valence_corr"]) and np.isnan(m["mean_corr"])
    # CCC is well defined here (zero covariance): 0, not NaN.
    close(m["valence_ccc"], 0.0)
    close(m["valence_ccc"], ccc_ref(y, p))
    close(m["valence_rmse"], np.sqrt(np.mean((y - 0.2) ** 2)))


def test_constant_target_and_equal_prediction_ccc_nan():
    y = np.full(20, 0.5)
    with pytest.warns(MetricWarning) as record:
        m = va_metrics(y, y)
    assert "CCC is undefined" in messages(record)
    assert "correlation is undefined" in messages(record)
    assert np.isnan(m["valence_ccc"]) and np.isnan(m["mean_ccc"])
    close(m["valence_rmse"], 0.0)
    close(m["valence_sagr"], 1.0)


def test_absent_class():
    labels, probs, va_true, va_pred = random_split(10, 300, 8)
    keep = labels != 7  # Contempt absent from the labels.
    labels, probs = labels[keep], probs[keep]
    va_true, va_pred = va_true[keep], va_pred[keep]
    with pytest.warns(MetricWarning) as record:
        m = compute_metrics(labels, probs, va_true, va_pred, NAMES8)
    assert "AUC and PR-AUC are undefined: class(es) ['Contempt'] absent" in messages(record)
    assert "recall is undefined for class(es) ['Contempt']" in messages(record)
    assert np.isnan(m["auc"]) and np.isnan(m["pr_auc"])
    assert np.isnan(m["recall_contempt"])
    preds = probs.argmax(1)
    assert np.any(preds == 7)  # Predicted though absent: precision 0, F1 0, macro F1 defined.
    close(m["precision_contempt"], 0.0)
    close(m["f1_contempt"], 0.0)
    close(
        m["f1_macro"],
        skm.f1_score(labels, preds, labels=range(8), average="macro", zero_division=0),
    )
    close(m["kappa"], skm.cohen_kappa_score(labels, preds, labels=range(8)))
    close(m["accuracy"], skm.accuracy_score(labels, preds))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn: a class predicted, not present
        close(m["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))
    close(m["balanced_accuracy"], np.mean([np.mean(preds[labels == k] == k) for k in range(7)]))
    assert len(m["confusion_matrix"]) == 8 and sum(m["confusion_matrix"][7]) == 0
    close(
        m["mean_ccc"],
        (
            ccc_ref(va_true[:, 0], np.clip(va_pred[:, 0], -1, 1))
            + ccc_ref(va_true[:, 1], np.clip(va_pred[:, 1], -1, 1))
        )
        / 2,
    )


def test_balanced_accuracy_is_mean_recall_on_imbalanced_labels():
    labels = np.array([0] * 90 + [1] * 8 + [2] * 2)
    preds = np.zeros(100, int)  # Always the majority class: 90% accuracy, 1/3 balanced.
    preds[90:94] = 1
    probs = np.eye(3)[preds] * 0.9 + 0.1 / 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MetricWarning)
        m = compute_metrics(labels, probs, None, None, ["a", "b", "c"])
    close(m["accuracy"], 0.94)
    close(m["balanced_accuracy"], (1.0 + 0.5 + 0.0) / 3)
    close(m["balanced_accuracy"], skm.balanced_accuracy_score(labels, preds))


def test_absent_and_never_predicted_class_makes_macro_f1_nan():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.full((6, 4), 0.1)
    probs[np.arange(6), labels] = 0.7  # Class 3 ("Surprise") neither present nor predicted.
    with pytest.warns(MetricWarning) as record:
        m = compute_metrics(labels, probs, None, None, NAMES8[:4])
    assert "macro F1 is undefined: class(es) ['Surprise']" in messages(record)
    assert np.isnan(m["f1_macro"]) and np.isnan(m["f1_surprise"])
    assert np.isnan(m["precision_surprise"]) and np.isnan(m["recall_surprise"])
    close(m["accuracy"], 1.0)
    close(m["f1_neutral"], 1.0)


def test_never_predicted_class_precision_nan():
    labels = np.array([0, 1, 2, 0, 1, 2])
    probs = np.full((6, 3), 0.2)
    probs[:, 0] = 0.6  # Always predicts class 0.
    with pytest.warns(MetricWarning, match="precision is undefined"):
        m = compute_metrics(labels, probs, None, None, ("x", "y", "z"))
    assert np.isnan(m["precision_y"]) and np.isnan(m["precision_z"])
    close(m["f1_y"], 0.0)
    close(m["f1_macro"], skm.f1_score(labels, probs.argmax(1), average="macro", zero_division=0))
    close(m["kappa"], 0.0)


def test_single_class_kappa_nan():
    labels = np.zeros(5, int)
    probs = np.tile([0.9, 0.1], (5, 1))
    with pytest.warns(MetricWarning) as record:
        m = compute_metrics(labels, probs, None, None, ("a", "b"))
    assert "kappa is undefined" in messages(record)
    assert np.isnan(m["kappa"]) and np.isnan(m["auc"])
    close(m["accuracy"], 1.0)


def test_without_valence_arousal():
    labels, probs, va_true, va_pred = random_split(11, 100, 8)
    m = compute_metrics(labels, probs, None, va_pred, NAMES8)
    assert not any(k.startswith(("valence_", "arousal_", "mean_")) for k in m)
    m = compute_metrics(labels, probs, np.full((100, 2), np.nan), va_pred, NAMES8)
    assert not any(k.startswith(("valence_", "arousal_", "mean_")) for k in m)


def test_unannotated_rows_are_ignored():
    labels, probs, va_true, va_pred = random_split(12, 100, 8)
    partial = va_true.copy()
    partial[::3] = np.nan
    m = compute_metrics(labels, probs, partial, va_pred, NAMES8)
    keep = ~np.isnan(partial[:, 0])
    close(m["valence_ccc"], ccc_ref(va_true[keep, 0], np.clip(va_pred[keep, 0], -1, 1)))
    close(
        m["arousal_rmse"],
        np.sqrt(np.mean((va_true[keep, 1] - np.clip(va_pred[keep, 1], -1, 1)) ** 2)),
    )
    close(m["accuracy"], np.mean(probs.argmax(1) == labels))  # Classification uses all rows.


@pytest.mark.parametrize(
    "change,match",
    [
        (
            lambda a: {**a, "probs": np.where(np.arange(50)[:, None] == 3, np.nan, a["probs"])},
            "probs has non-finite values",
        ),
        (
            lambda a: {**a, "va_pred": np.where(np.arange(50)[:, None] == 7, np.nan, a["va_pred"])},
            "va_pred has non-finite values",
        ),
        (lambda a: {**a, "probs": a["probs"][:-1]}, "labels has 50 rows, probs has 49"),
        (lambda a: {**a, "va_true": a["va_true"][:-2]}, "va_true has 48"),
        (lambda a: {**a, "va_pred": a["va_pred"][:-1]}, "va_pred has 49"),
        (lambda a: {**a, "probs": np.log(a["probs"])}, "logits"),
        (lambda a: {**a, "class_names": NAMES8[:7]}, "7 names"),
        (lambda a: {**a, "labels": a["labels"] + 1}, r"labels must lie in \[0, 8\)"),
        (lambda a: {**a, "va_pred": None}, "va_pred is None"),
        (lambda a: {**a, "va_true": a["va_true"][:, :1]}, r"shape \(N, 2\)"),
    ],
)
def test_bad_inputs_raise(change, match):
    labels, probs, va_true, va_pred = random_split(13, 50, 8)
    args = dict(labels=labels, probs=probs, va_true=va_true, va_pred=va_pred, class_names=NAMES8)
    with pytest.raises(ValueError, match=match):
        compute_metrics(**change(args))
