"""Evaluation metrics of the study, computed once over a whole split.

Definitions: docs/study.md, "Metrics".

Expression metrics come from scikit-learn; only SAGR and CCC are written here. Undefined values
(a class absent from the labels, a constant prediction, ...) are NaN with a ``MetricWarning``,
never an exception and never a substitute number. Malformed inputs (NaN predictions, mismatched
lengths, logits instead of probabilities) are bugs upstream and raise ``ValueError``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

VA_DIMENSIONS = ("valence", "arousal")
REGRESSION_METRICS = ("rmse", "corr", "sagr", "ccc")


class MetricWarning(UserWarning):
    """A metric is undefined for the given data and was set to NaN."""


def _warn(message: str) -> None:
    warnings.warn(message, MetricWarning, stacklevel=3)


def metric_key_name(class_name: str) -> str:
    """Lowercases a class name and replaces runs of non-alphanumerics by ``_`` (for keys)."""
    key = re.sub(r"[^0-9a-z]+", "_", class_name.strip().lower()).strip("_")
    if not key:
        raise ValueError(f"class name {class_name!r} gives an empty metric key")
    return key


def sagr(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Sign agreement: ``mean(sign(y) == sign(p))``.

    Uses ``np.sign``, so a zero matches only a zero (a prediction of exactly 0 for a positive
    target counts as a disagreement).
    """
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    return float(np.mean(np.sign(y_true) == np.sign(y_pred)))


def ccc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Concordance correlation coefficient with population (ddof=0) moments, as EmoNet.

    ``2 cov(y, p) / (var(y) + var(p) + (mean(y) - mean(p))^2)``. A constant prediction of a
    varying target is well defined (CCC = 0); only a zero denominator (both constant and equal)
    is undefined: NaN with a ``MetricWarning``.
    """
    y_true, y_pred = np.asarray(y_true, np.float64), np.asarray(y_pred, np.float64)
    mean_t, mean_p = y_true.mean(), y_pred.mean()
    var_t, var_p = y_true.var(), y_pred.var()
    cov = np.mean((y_true - mean_t) * (y_pred - mean_p))
    denominator = var_t + var_p + (mean_t - mean_p) ** 2
    if denominator == 0.0:
        _warn("CCC is undefined: target and prediction are the same constant")
        return float("nan")
    return float(2.0 * cov / denominator)


def _pearson(y_true: np.ndarray, y_pred: np.ndarray, what: str) -> float:
    # pearsonr would warn (ConstantInputWarning) and return NaN; warn with our class instead.
    if y_true.size < 2 or np.ptp(y_true) == 0.0 or np.ptp(y_pred) == 0.0:
        _warn(
            f"{what} correlation is undefined: constant target or prediction "
            f"(or fewer than 2 examples)"
        )
        return float("nan")
    import scipy.stats  # here: prediction imports this module's names, not SciPy's statistics

    return float(scipy.stats.pearsonr(y_true, y_pred).statistic)


def _check_labels(labels: Any, num_classes: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D (N,), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        # Accept integral floats (e.g. labels read back from a float column), nothing else.
        if not (
            np.issubdtype(labels.dtype, np.floating)
            and np.all(np.isfinite(labels))
            and np.all(labels == np.round(labels))
        ):
            raise ValueError(f"labels must be integer class indices, got dtype {labels.dtype}")
        labels = labels.astype(np.int64)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"labels must lie in [0, {num_classes}), got range [{labels.min()}, {labels.max()}]"
        )
    return labels


def _check_probs(probs: Any, n: int) -> np.ndarray:
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2:
        raise ValueError(f"probs must be 2-D (N, C), got shape {probs.shape}")
    if probs.shape[0] != n:
        raise ValueError(f"length mismatch: labels has {n} rows, probs has {probs.shape[0]}")
    bad_rows = np.flatnonzero(~np.all(np.isfinite(probs), axis=1))
    if bad_rows.size:
        raise ValueError(
            f"probs has non-finite values in {bad_rows.size} rows (first: row "
            f"{bad_rows[0]}); the model or the evaluation loop is broken"
        )
    # Same tolerance as sklearn's roc_auc_score check, so sklearn never raises on its own.
    if np.any(probs < 0) or np.any(probs > 1) or not np.allclose(1.0, probs.sum(axis=1)):
        raise ValueError(
            "probs must be softmax probabilities (in [0, 1], rows summing to 1); "
            "were logits passed?"
        )
    return probs


def _check_va(va: Any, name: str, n: int) -> np.ndarray:
    va = np.asarray(va, dtype=np.float64)
    if va.ndim != 2 or va.shape[1] != 2:
        raise ValueError(f"{name} must have shape (N, 2) (valence, arousal), got {va.shape}")
    if va.shape[0] != n:
        raise ValueError(f"length mismatch: labels has {n} rows, {name} has {va.shape[0]}")
    return va


def _classification_metrics(
    labels: np.ndarray, probs: np.ndarray, class_keys: Sequence[str], class_names: Sequence[str]
) -> dict[str, Any]:
    from sklearn import metrics as skm
    from sklearn.exceptions import UndefinedMetricWarning

    num_classes = probs.shape[1]
    class_range = list(range(num_classes))
    preds = np.argmax(probs, axis=1)  # Ties go to the lowest class index.
    support = np.bincount(labels, minlength=num_classes)
    absent = [class_names[k] for k in class_range if support[k] == 0]
    predicted = np.bincount(preds, minlength=num_classes)
    out: dict[str, Any] = {"accuracy": float(skm.accuracy_score(labels, preds))}
    with warnings.catch_warnings():
        # sklearn warns of predicted classes absent from the labels; we warn ourselves below.
        warnings.simplefilter("ignore", UserWarning)
        out["balanced_accuracy"] = float(skm.balanced_accuracy_score(labels, preds))

    # zero_division=nan marks undefined per-class values; we warn about them ourselves.
    precision, recall, f1, _ = skm.precision_recall_fscore_support(
        labels, preds, labels=class_range, average=None, zero_division=np.nan
    )
    f1_undefined = [class_names[k] for k in class_range if np.isnan(f1[k])]
    if f1_undefined:
        # sklearn's macro average would silently skip these classes; the rule is NaN instead.
        _warn(
            f"macro F1 is undefined: class(es) {f1_undefined} are neither in the labels "
            f"nor predicted"
        )
        out["f1_macro"] = float("nan")
    else:
        out["f1_macro"] = float(
            skm.f1_score(labels, preds, labels=class_range, average="macro", zero_division=np.nan)
        )

    if absent:
        _warn(f"AUC and PR-AUC are undefined: class(es) {absent} absent from the labels")
        out["auc"] = out["pr_auc"] = float("nan")
    else:
        # All classes present with C >= 2, so each one-vs-rest column has both outcomes.
        if num_classes > 2:
            out["auc"] = float(
                skm.roc_auc_score(
                    labels, probs, multi_class="ovr", average="macro", labels=class_range
                )
            )
        else:
            # Binary: both one-vs-rest AUCs equal the AUC of p(class 1), so that is the macro.
            out["auc"] = float(skm.roc_auc_score(labels, probs[:, 1]))
        one_hot = np.eye(num_classes, dtype=np.int64)[labels]
        out["pr_auc"] = float(skm.average_precision_score(one_hot, probs, average="macro"))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UndefinedMetricWarning)  # We warn ourselves.
        kappa = skm.cohen_kappa_score(
            labels, preds, labels=class_range, replace_undefined_by=np.nan
        )
    if np.isnan(kappa):
        _warn("Cohen's kappa is undefined: labels and predictions are one and the same class")
    out["kappa"] = float(kappa)

    never_predicted = [class_names[k] for k in class_range if predicted[k] == 0]
    if never_predicted:
        _warn(f"precision is undefined for never-predicted class(es) {never_predicted}")
    if absent:
        _warn(f"recall is undefined for class(es) {absent} absent from the labels")
    for k, key in enumerate(class_keys):
        out[f"precision_{key}"] = float(precision[k])
        out[f"recall_{key}"] = float(recall[k])
        out[f"f1_{key}"] = float(f1[k])
    out["_confusion_matrix"] = skm.confusion_matrix(labels, preds, labels=class_range)
    return out


def _regression_metrics(va_true: np.ndarray, va_pred: np.ndarray) -> dict[str, float]:
    # Rows without annotation (NaN target, e.g. mixed sources) do not count.
    annotated = np.all(np.isfinite(va_true), axis=1)
    if not annotated.any():
        return {}
    va_true, va_pred = va_true[annotated], np.clip(va_pred[annotated], -1.0, 1.0)
    out: dict[str, float] = {}
    for d, dim in enumerate(VA_DIMENSIONS):
        y, p = va_true[:, d], va_pred[:, d]
        out[f"{dim}_rmse"] = float(np.sqrt(np.mean((y - p) ** 2)))
        out[f"{dim}_corr"] = _pearson(y, p, dim)
        out[f"{dim}_sagr"] = sagr(y, p)
        out[f"{dim}_ccc"] = ccc(y, p)
    for m in REGRESSION_METRICS:
        # NaN if either dimension is undefined (already warned about).
        out[f"mean_{m}"] = float(np.mean([out[f"{dim}_{m}"] for dim in VA_DIMENSIONS]))
    return out


def compute_metrics(
    labels: np.ndarray,
    probs: np.ndarray,
    va_true: np.ndarray | None,
    va_pred: np.ndarray | None,
    class_names: Sequence[str],
) -> dict[str, Any]:
    """All metrics of a split in one flat dict.

    Args:
      labels: ``(N,)`` int expression labels in ``[0, C)``.
      probs: ``(N, C)`` softmax probabilities; the predicted class is the argmax (ties: lowest
        index).
      va_true: ``(N, 2)`` valence/arousal targets, or None when the data has none. Rows with a
        NaN target are left out of the regression metrics.
      va_pred: ``(N, 2)`` valence/arousal predictions (required when ``va_true`` is given).
        They are clipped to [-1, 1] before scoring (EmoNet does the same).
      class_names: the C class names; per-class keys use them lowercased, non-alphanumerics as
        ``_`` (``"Neutral"`` -> ``precision_neutral``).

    Returns:
      Floats: ``accuracy``, ``balanced_accuracy`` (mean per-class recall over the classes present
      in the labels, scikit-learn's ``balanced_accuracy_score``), ``f1_macro``, ``auc`` (macro
      one-vs-rest ROC-AUC), ``pr_auc``
      (macro average precision), ``kappa``; ``precision_<name>``, ``recall_<name>``,
      ``f1_<name>`` per class; ``{valence,arousal,mean}_{rmse,corr,sagr,ccc}`` only when
      ``va_true`` is given with at least one annotated row (otherwise these keys are absent).
      One key is not a float: ``confusion_matrix``, a list of C lists of C ints (rows = true,
      columns = predicted class), last in the dict.

      Undefined values are NaN with a ``MetricWarning``: ``auc``/``pr_auc`` when a class is
      absent from the labels; a class's recall when it is absent, its precision when it is never
      predicted, its F1 (and ``f1_macro``) when both; ``kappa`` when labels and predictions are
      one single class; ``corr`` for a constant target or prediction; ``ccc`` only when target
      and prediction are the same constant (a constant prediction of a varying target has CCC
      0). ``mean_*`` is NaN when either dimension is.

    Raises:
      ValueError: on mismatched lengths (naming the arrays), non-finite or non-probability
        ``probs``, non-finite ``va_pred`` rows, bad shapes or labels out of range.
    """
    class_names = [str(c) for c in class_names]
    num_classes = len(class_names)
    if num_classes < 2:
        raise ValueError(f"need at least 2 class names, got {class_names}")
    class_keys = [metric_key_name(c) for c in class_names]
    if len(set(class_keys)) != num_classes:
        raise ValueError(f"class names {class_names} collide as metric keys {class_keys}")
    probs_shape = np.shape(probs)
    # Checked first: a wrong class count would otherwise surface as labels out of range.
    if len(probs_shape) == 2 and probs_shape[1] != num_classes:
        raise ValueError(
            f"probs has {probs_shape[1]} columns but class_names has {num_classes} names"
        )
    labels = _check_labels(labels, num_classes)
    n = labels.shape[0]
    if n == 0:
        raise ValueError("cannot compute metrics of an empty split")
    probs = _check_probs(probs, n)

    out = _classification_metrics(labels, probs, class_keys, class_names)
    confusion = out.pop("_confusion_matrix")

    if va_true is not None:
        if va_pred is None:
            raise ValueError("va_true is given but va_pred is None")
        va_true = _check_va(va_true, "va_true", n)
        va_pred = _check_va(va_pred, "va_pred", n)
        bad_rows = np.flatnonzero(~np.all(np.isfinite(va_pred), axis=1))
        if bad_rows.size:
            raise ValueError(
                f"va_pred has non-finite values in {bad_rows.size} rows (first: "
                f"row {bad_rows[0]}); the model or the evaluation loop is broken"
            )
        out.update(_regression_metrics(va_true, va_pred))

    out["confusion_matrix"] = [[int(v) for v in row] for row in confusion]
    return out
