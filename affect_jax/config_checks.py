"""What every configuration field may hold, checked once before a run builds or writes anything.

``validate`` raises ``ConfigError`` with one line per bad field: the field, its value and what is
allowed (``config.batch_size=0: expected an integer >= 1``). The fields and their defaults are
documented in ``configs/default.py``; the vocabularies (backbones, sources, kernel options, ...)
are those of the modules that use them.

The library functions below the command line take a validated config and do not check it again;
only functions that users call with their own arguments keep a guard (the backbone classes'
``width``, ``ops`` kernels' ``impl``, the data readers' own files and options).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from typing import Any

import ml_collections

from affect_jax import data, imbalance, models
from affect_jax.errors import UserError
from affect_jax.metrics import REGRESSION_METRICS, VA_DIMENSIONS
from affect_jax.ops import native

# A check returns what is allowed when ``value`` is not, else None.
Check = Callable[[Any], "str | None"]

MODEL_INITS = ("imagenet", "random")
BEST_MODES = ("max", "min")
NUM_CLASSES = (7, 8)  # AffectNet's two protocols; every source orders its classes that way.
_KERNEL_FIELDS = ("conv_impl", "batch_norm_impl", "pool_impl")
# Validation metrics a checkpoint can be ranked by (besides per-class precision/recall/F1).
SCALAR_METRICS = (
    "loss",
    "accuracy",
    "balanced_accuracy",
    "f1_macro",
    "auc",
    "pr_auc",
    "kappa",
) + tuple(f"{d}_{m}" for d in (*VA_DIMENSIONS, "mean") for m in REGRESSION_METRICS)
_PER_CLASS_METRIC = re.compile(r"(precision|recall|f1)_[a-z0-9_]+")


class ConfigError(UserError, ValueError):
    """The configuration has values that cannot work; one line per field."""


# ---------------------------------------------------------------------------------------------
# Checks of one value
# ---------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def integer(minimum: int | None = None) -> Check:
    allowed = "an integer" + (f" >= {minimum}" if minimum is not None else "")
    return lambda v: None if _is_int(v) and (minimum is None or v >= minimum) else allowed


def number(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = True,
) -> Check:
    """A finite number in the interval from ``low`` to ``high`` (open or closed ends)."""
    if low is not None and high is not None:
        allowed = (
            f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    elif low is not None:
        allowed = f"a number {'>' if low_open else '>='} {low:g}"
    else:
        allowed = "a finite number"

    def check(v: Any) -> str | None:
        if not _is_number(v):
            return allowed
        if low is not None and (v <= low if low_open else v < low):
            return allowed
        if high is not None and (v >= high if high_open else v > high):
            return allowed
        return None

    return check


def one_of(choices: Any) -> Check:
    choices = tuple(choices)
    allowed = "one of " + ", ".join(map(repr, choices))
    return lambda v: None if isinstance(v, str) and v in choices else allowed


def boolean(v: Any) -> str | None:
    return None if isinstance(v, bool) else "True or False"


def text(v: Any) -> str | None:
    return None if isinstance(v, str) else "a string"


def positive_sizes(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and all(_is_int(s) and s >= 1 for s in v)
    return None if ok else "a tuple of integers >= 1, e.g. (256,) or () for none"


def area_range(v: Any) -> str | None:
    ok = (
        isinstance(v, (tuple, list))
        and len(v) == 2
        and all(_is_number(s) for s in v)
        and 0 < v[0] <= v[1] <= 1
    )
    return None if ok else "(min, max) area fractions with 0 < min <= max <= 1"


def steps_cap(v: Any) -> str | None:
    return None if _is_int(v) and (v == -1 or v >= 1) else "-1 (whole epochs) or an integer >= 1"


def backbone_rate(v: Any) -> str | None:
    ok = _is_number(v) and v != 0
    return None if ok else "a number > 0, or negative for the same as learning_rate"


def class_fractions(v: Any) -> str | None:
    ok = isinstance(v, (tuple, list)) and all(_is_number(f) and 0 < f <= 1 for f in v)
    return None if ok else "() for all drawn faces, or one fraction in (0, 1] per class"


def kernel_impl(v: Any) -> str | None:
    return native.allowed_impls(v) if isinstance(v, str) else native.allowed_impls("")


def best_metric(v: Any) -> str | None:
    if isinstance(v, str) and (v in SCALAR_METRICS or _PER_CLASS_METRIC.fullmatch(v)):
        return None
    return (
        "a validation metric: one of "
        + ", ".join(SCALAR_METRICS)
        + ", or precision_/recall_/f1_<class>, e.g. f1_happy"
    )


RULES: dict[str, Check] = {
    "model.name": one_of(models.BACKBONES),
    "model.init": one_of(MODEL_INITS),
    "model.weights": text,
    "model.width": number(0, low_open=True, high_open=False),
    "model.pooling": one_of(models.POOLINGS),
    "model.hidden_sizes": positive_sizes,
    "model.dropout": number(0.0, 1.0),
    "model.freeze_backbone": boolean,
    "data.source": one_of(sorted(data.SOURCES)),
    "data.dir": text,
    "data.layout": text,  # its options are the source's (checked below for affectnet)
    "data.num_classes": lambda v: None if v in NUM_CLASSES and _is_int(v) else "7 or 8",
    "data.image_size": integer(1),
    "data.val_fraction": number(0.0, 1.0, low_open=True),
    "data.split_seed": integer(),
    "data.face_margin": number(0.0),
    "data.preprocessing": one_of(data.PREPROCESSING_MODES),
    "data.synthetic_size": integer(1),
    "data.tfds_data_dir": text,
    "data.image_root": text,
    "data.sampling": one_of(imbalance.SAMPLINGS),
    "data.synthetic_class_fractions": class_fractions,
    "augment.enabled": boolean,
    "augment.flip": boolean,
    "augment.crop_scale": area_range,
    "augment.rotation_degrees": number(0.0),
    "augment.color_jitter": number(0.0),
    "batch_size": integer(1),
    "eval_batch_size": integer(1),
    "num_epochs": integer(1),
    "learning_rate": number(0.0, low_open=True),
    "backbone_learning_rate": backbone_rate,
    "adam_b1": number(0.0, 1.0),
    "adam_b2": number(0.0, 1.0),
    "adam_epsilon": number(0.0, low_open=True),
    "loss_weights.classification": number(0.0),
    "loss_weights.regression": number(0.0),
    "loss_weights.ccc": number(0.0),
    "loss_weights.class_weighting": one_of(imbalance.CLASS_WEIGHTINGS),
    "loss_weights.effective_number_beta": number(0.0, 1.0),
    "compute_dtype": one_of(models.COMPUTE_DTYPES),
    "activation_dtype": one_of(models.ACTIVATION_DTYPES),
    **{field: kernel_impl for field in _KERNEL_FIELDS},
    "steps_per_execution": integer(1),
    "seed": integer(),
    "best_metric": best_metric,
    "best_mode": one_of(BEST_MODES),
    "keep_checkpoints": integer(1),
    "log_every_steps": integer(1),
    "steps_per_epoch": steps_cap,
    "compilation_cache_dir": text,
}
_MISSING = object()


def _get(config: ml_collections.ConfigDict, path: str) -> Any:
    value: Any = config
    for key in path.split("."):
        if not isinstance(value, (ml_collections.ConfigDict, dict)) or key not in value:
            return _MISSING
        value = value[key]
    return value


def _line(path: str, value: Any, allowed: str) -> str:
    return f"config.{path}={value!r}: expected {allowed}"


# ---------------------------------------------------------------------------------------------
# Checks across fields
# ---------------------------------------------------------------------------------------------


def _field_errors(config: ml_collections.ConfigDict) -> list[str]:
    errors = []
    for path, check in RULES.items():
        value = _get(config, path)
        if value is _MISSING:
            errors.append(f"config.{path} is missing (every field: configs/default.py)")
            continue
        allowed = check(value)
        if allowed:
            errors.append(_line(path, value, allowed))
    return errors


def _device_errors(
    config: ml_collections.ConfigDict, device_count: int, process_count: int
) -> list[str]:
    """The global batches must split evenly over the devices and over the processes."""
    errors = []
    for field in ("batch_size", "eval_batch_size"):
        value = config[field]
        for n, what in ((device_count, "devices"), (process_count, "processes")):
            if n > 1 and value % n:
                errors.append(_line(field, value, f"a multiple of the {n} {what}"))
    return errors


def _combination_errors(config: ml_collections.ConfigDict) -> list[str]:
    """Fields whose allowed values depend on others (each field itself is valid)."""
    errors = []
    m, data = config.model, config.data
    minimum = models.min_image_size(m.name)
    if data.image_size < minimum:
        errors.append(
            _line(
                "data.image_size",
                data.image_size,
                f"an integer >= {minimum} for model.name={m.name!r}",
            )
        )
    if data.source == "affectnet":
        if not data.dir:
            errors.append(
                "config.data.source='affectnet' needs config.data.dir: pass "
                "--config.data.dir=/path/to/AffectNet (any layout listed in the README), or "
                "train on drawn faces with --config.data.source=synthetic"
            )
        from affect_jax.data.affectnet.layouts import LAYOUTS  # TFDS only with AffectNet

        allowed = one_of(("auto", *LAYOUTS))(data.layout)
        if allowed:
            errors.append(_line("data.layout", data.layout, allowed))
    fractions = data.synthetic_class_fractions
    if fractions and len(fractions) != data.num_classes:
        errors.append(
            _line(
                "data.synthetic_class_fractions",
                tuple(fractions),
                f"{data.num_classes} fractions (data.num_classes), one per class",
            )
        )
    weights = config.loss_weights
    if not weights.classification + weights.regression + weights.ccc > 0:
        errors.append(
            "config.loss_weights: expected at least one of classification, "
            "regression, ccc > 0 (all are 0: nothing would be learnt)"
        )
    return errors


def _training_errors(config: ml_collections.ConfigDict) -> list[str]:
    """What only training needs: the ImageNet weights to start from."""
    weights = config.model.weights
    if config.model.init != "imagenet":
        return []
    if not weights:
        return [
            "config.model.init='imagenet' needs the Keras ImageNet weights: pass "
            "--config.model.weights=DIR (written by affect-jax-port-weights) or a Keras "
            "application .h5 file, or train from scratch with --config.model.init=random"
        ]
    if not os.path.exists(os.path.expanduser(weights)):
        return [
            f"config.model.weights={weights!r}: no such file or directory (expected a "
            "directory written by affect-jax-port-weights or a Keras .h5 file)"
        ]
    return []


def config_errors(
    config: ml_collections.ConfigDict,
    *,
    device_count: int = 1,
    process_count: int = 1,
    training: bool = True,
) -> list[str]:
    """Every problem of ``config``, one line each ([] when it is valid).

    ``training``: also what training needs beyond scoring a saved run (the ImageNet weights).
    """
    errors = _field_errors(config)
    if errors:  # the checks below assume valid fields
        return errors
    errors = _device_errors(config, device_count, process_count)
    errors += _combination_errors(config)
    if training:
        errors += _training_errors(config)
    return errors


def validate(
    config: ml_collections.ConfigDict,
    *,
    device_count: int | None = None,
    process_count: int | None = None,
    training: bool = True,
) -> None:
    """Raises ``ConfigError`` (one line per bad field) unless ``config`` can run.

    ``device_count``/``process_count``: of the run (default: JAX's, for the batch sizes).
    """
    if device_count is None or process_count is None:
        import jax

        device_count = jax.device_count() if device_count is None else device_count
        process_count = jax.process_count() if process_count is None else process_count
    errors = config_errors(
        config, device_count=device_count, process_count=process_count, training=training
    )
    if errors:
        raise ConfigError("\n".join(errors))
