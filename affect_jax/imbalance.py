"""Class imbalance: per-class loss weights and class-balanced epoch orders (docs/imbalance.md).

``config.loss_weights.class_weighting``: ``none`` (the study), ``inverse_frequency`` or
``effective_number`` (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples",
CVPR 2019: ``(1 - beta) / (1 - beta^n_c)``, with ``config.loss_weights.effective_number_beta``),
computed from the training split's class counts. Either is scaled so that the average weight
over the training examples is 1 (``sum_c n_c w_c = N``, scikit-learn's ``'balanced'``
convention for inverse frequency): the cross-entropy keeps its overall size, so its balance
against the valence/arousal terms and the learning rate mean what they meant without weights.
The weights multiply the cross-entropy only; the regression terms are never weighted by class.

``config.data.sampling``: ``shuffle`` (every training example once per epoch, in a seeded order)
or ``balanced`` (``balanced_order``: each class drawn equally often).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import ml_collections
import numpy as np
from absl import logging

from affect_jax import console, strict_json

CLASS_WEIGHTINGS = ("none", "inverse_frequency", "effective_number")
SAMPLINGS = ("shuffle", "balanced")
CLASS_BALANCE_FILE = "class_balance.json"


def class_weights(counts: Sequence[int], weighting: str, beta: float = 0.999) -> np.ndarray:
    """float32 weight per class from the training split's ``counts`` (classes absent from it
    get 0: no example carries them). The average weight over the examples is 1."""
    counts = np.asarray(counts, np.float64)
    present = counts > 0
    if weighting == "none":
        return np.ones(len(counts), np.float32)
    raw = np.zeros(len(counts))
    if weighting == "inverse_frequency":
        raw[present] = 1.0 / counts[present]
    elif weighting == "effective_number":
        # (1 - beta^n) / (1 - beta) effective samples; beta = 0 gives 1 (no weighting).
        raw[present] = (1.0 - beta) / (1.0 - np.power(beta, counts[present]))
    else:
        raise ValueError(f"class weighting {weighting!r}; expected one of {CLASS_WEIGHTINGS}")
    return (raw * counts.sum() / (raw * counts).sum()).astype(np.float32)


def balanced_order(labels: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    """Indices of one class-balanced epoch: as many draws as ``labels`` has rows, spread
    equally over the classes present (the remainder to randomly chosen classes).

    A class's draws walk through reshuffled copies of its examples, so a rare class repeats
    its examples and a frequent one shows a different random subset every epoch. A pure
    function of (seed, epoch), like ``pipeline.epoch_permutation``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng([seed, epoch, 1])
    classes = np.unique(labels)
    quota = np.full(len(classes), len(labels) // len(classes))
    quota[rng.permutation(len(classes))[: len(labels) % len(classes)]] += 1
    drawn = []
    for c, n in zip(classes, quota, strict=True):
        members = np.flatnonzero(labels == c)
        copies = -(-n // len(members))
        drawn.append(np.concatenate([rng.permutation(members) for _ in range(copies)])[:n])
    return rng.permutation(np.concatenate(drawn))


def write_class_balance(
    workdir: str,
    class_names: Sequence[str],
    counts: Sequence[int],
    weights: np.ndarray,
    weighting: str,
    beta: float,
    sampling: str,
    epoch_length: int,
) -> str:
    """Writes ``<workdir>/class_balance.json`` (the training counts, weights and sampling)."""
    record = {
        "class_weighting": weighting,
        "effective_number_beta": beta if weighting == "effective_number" else None,
        "sampling": sampling,
        "epoch_length": int(epoch_length),
        "train_counts": {name: int(n) for name, n in zip(class_names, counts, strict=True)},
        "class_weights": {name: float(w) for name, w in zip(class_names, weights, strict=True)},
    }
    path = os.path.join(workdir, CLASS_BALANCE_FILE)
    strict_json.write(path, record)
    return path


def training_class_weights(
    config: ml_collections.ConfigDict,
    labels: np.ndarray,
    class_names: Sequence[str],
    workdir: str | None,
) -> np.ndarray | None:
    """The cross-entropy's class weights of a run (None for 'none'), from the training split's
    ``labels``; logs them and, when ``workdir`` is given, writes ``class_balance.json``."""
    weighting = config.loss_weights.get("class_weighting", "none")
    beta = float(config.loss_weights.get("effective_number_beta", 0.999))
    sampling = config.data.get("sampling", "shuffle")
    counts = np.bincount(labels, minlength=len(class_names))
    weights = class_weights(counts, weighting, beta)
    logging.info(
        "Training split per class: %s; class weighting %r%s; sampling %r (%d examples per epoch%s)",
        dict(zip(class_names, counts.tolist(), strict=True)),
        weighting,
        ""
        if weighting == "none"
        else ": " + ", ".join(f"{n} {w:.3g}" for n, w in zip(class_names, weights, strict=True)),
        sampling,
        len(labels),
        ", each class drawn equally often" if sampling == "balanced" else "",
        # The study's settings need no console line; class_balance.json has the counts too.
        extra=console.FILE_ONLY if weighting == "none" and sampling == "shuffle" else None,
    )
    if weighting != "none" and sampling == "balanced":
        logging.warning(
            "Class weights on class-balanced batches weight the classes twice; "
            "docs/imbalance.md suggests one of the two."
        )
    if workdir:
        write_class_balance(
            workdir, class_names, counts, weights, weighting, beta, sampling, len(labels)
        )
    return None if weighting == "none" else weights
