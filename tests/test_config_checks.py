"""The start-up validation of the config: every bad value refused in one line."""

import ml_collections
import pytest

from affect_jax import config_checks
from tests.conftest import CONFIGS as CONFIGS_DIR
from tests.conftest import load_config, tiny_config


def _tiny_with(field: str, value) -> ml_collections.ConfigDict:
    """The tiny config with ``field`` set to ``value`` of any type (as a config file may)."""
    config = ml_collections.ConfigDict(tiny_config().to_dict(), type_safe=False)
    parent, _, key = field.rpartition(".")
    (config[parent] if parent else config)[key] = value
    return config


@pytest.mark.parametrize("name", ["default", "resnet50", "vgg16", "demo"])
def test_shipped_configs_are_valid(name):
    config = load_config(name)
    if config.data.source == "affectnet":
        config.data.dir, config.model.weights = "/data/AffectNet", CONFIGS_DIR
    assert config_checks.config_errors(config) == []


def test_study_configs_differ_only_in_the_backbone():
    resnet50, vgg16 = load_config("resnet50"), load_config("vgg16")
    vgg16.model.name = "resnet50"
    assert resnet50.to_dict() == vgg16.to_dict()


@pytest.mark.parametrize(
    "field, value, match",
    [
        ("batch_size", 0, "config.batch_size=0: expected an integer >= 1"),
        ("batch_size", -1, "config.batch_size=-1: expected an integer >= 1"),
        ("eval_batch_size", 0, "config.eval_batch_size=0: expected an integer >= 1"),
        ("num_epochs", 0, "config.num_epochs=0: expected an integer >= 1"),
        ("num_epochs", -1, "config.num_epochs=-1: expected an integer >= 1"),
        ("learning_rate", -1.0, "config.learning_rate=-1.0: expected a number > 0"),
        ("learning_rate", 0.0, "config.learning_rate=0.0: expected a number > 0"),
        ("learning_rate", float("nan"), "config.learning_rate=nan: expected a number > 0"),
        (
            "backbone_learning_rate",
            0.0,
            "config.backbone_learning_rate=0.0: expected a number "
            "> 0, or negative for the same as learning_rate",
        ),
        ("adam_b1", 1.0, r"config.adam_b1=1.0: expected a number in \[0, 1\)"),
        ("adam_epsilon", 0.0, "config.adam_epsilon=0.0: expected a number > 0"),
        ("loss_weights.regression", -1.0, "config.loss_weights.regression=-1.0"),
        (
            "steps_per_epoch",
            0,
            r"config.steps_per_epoch=0: expected -1 \(whole epochs\) or an "
            "integer >= 1",
        ),
        ("steps_per_epoch", -2, "config.steps_per_epoch=-2"),
        ("steps_per_execution", 0, "config.steps_per_execution=0: expected an integer >= 1"),
        ("keep_checkpoints", 0, "config.keep_checkpoints=0"),
        ("log_every_steps", 0, "config.log_every_steps=0"),
        ("best_mode", "up", "config.best_mode='up': expected one of 'max', 'min'"),
        (
            "best_metric",
            "val_accuracy",
            "config.best_metric='val_accuracy': expected a "
            "validation metric: one of loss, accuracy",
        ),
        (
            "model.name",
            "resnet18",
            "config.model.name='resnet18': expected one of 'resnet50', 'vgg16'",
        ),
        ("model.name", "alexnet", "alexnet.*resnet50"),
        (
            "model.init",
            "scratch",
            "config.model.init='scratch': expected one of 'imagenet', 'random'",
        ),
        ("model.width", 0.0, "config.model.width=0.0: expected a number > 0"),
        ("model.width", -0.5, "config.model.width=-0.5"),
        (
            "model.pooling",
            "sum",
            "config.model.pooling='sum': expected one of 'avg', 'max', 'flatten'",
        ),
        (
            "model.hidden_sizes",
            (16, 0),
            r"config.model.hidden_sizes=\(16, 0\): expected a tuple "
            "of integers >= 1",
        ),
        ("model.dropout", 1.0, r"config.model.dropout=1.0: expected a number in \[0, 1\)"),
        (
            "data.source",
            "imagenet",
            "config.data.source='imagenet': expected one of 'affectnet', 'synthetic'",
        ),
        ("data.num_classes", 1, "config.data.num_classes=1: expected 7 or 8"),
        ("data.image_size", 0, "config.data.image_size=0: expected an integer >= 1"),
        (
            "data.image_size",
            16,
            "config.data.image_size=16: expected an integer >= 32 for model.name='vgg16'",
        ),
        (
            "data.val_fraction",
            1.5,
            r"config.data.val_fraction=1.5: expected a number in "
            r"\(0, 1\)",
        ),
        ("data.val_fraction", 0.0, "config.data.val_fraction=0.0"),
        ("data.face_margin", -0.1, "config.data.face_margin=-0.1: expected a number >= 0"),
        (
            "data.preprocessing",
            "bogus",
            "config.data.preprocessing='bogus': expected one of 'auto', 'caffe', 'unit'",
        ),
        ("data.synthetic_size", 0, "config.data.synthetic_size=0"),
        (
            "augment.crop_scale",
            (0.9, 0.8),
            r"config.augment.crop_scale=\(0.9, 0.8\): expected "
            r"\(min, max\) area fractions",
        ),
        ("augment.rotation_degrees", -1.0, "config.augment.rotation_degrees=-1.0"),
        (
            "compute_dtype",
            "float16",
            "config.compute_dtype='float16': expected one of 'float32', 'bfloat16'",
        ),
        ("activation_dtype", "bfloat16", "config.activation_dtype='bfloat16'"),
        ("batch_norm_impl", "onednn", "config.batch_norm_impl='onednn'"),
        ("pool_impl", "fast", "config.pool_impl='fast': expected one of 'auto', 'xla', 'native'"),
        (
            "conv_impl",
            "onednn",
            r"config.conv_impl='onednn': expected one of 'auto', 'xla', "
            r"'native' \('native', the extension's kernels, replaced",
        ),
        ("conv_impl", "winograd", "config.conv_impl='winograd': expected one of"),
        ("conv_impl", "dot", "config.conv_impl='dot': .*'auto' picks the fastest path"),
        ("conv_impl", "im2col", "config.conv_impl='im2col'"),
        (
            "loss_weights.class_weighting",
            "inverse",
            "config.loss_weights.class_weighting='inverse': expected one of 'none'",
        ),
        (
            "loss_weights.effective_number_beta",
            1.0,
            "config.loss_weights.effective_number_beta="
            r"1.0: expected a number in \[0, 1\)",
        ),
        (
            "data.sampling",
            "oversample",
            "config.data.sampling='oversample': expected one of 'shuffle', 'balanced'",
        ),
        ("data.synthetic_class_fractions", (0.5, 0.0), "config.data.synthetic_class_fractions"),
        (
            "data.synthetic_class_fractions",
            (0.5,) * 3,
            r"config.data.synthetic_class_fractions="
            r"\(0.5, 0.5, 0.5\): expected 8 ",
        ),
        ("best_metric", "balanced_acc", "config.best_metric='balanced_acc'"),
    ],
)
def test_bad_value_is_one_line_naming_field_value_and_what_is_allowed(field, value, match):
    config = _tiny_with(field, value)
    with pytest.raises(config_checks.ConfigError, match=match) as raised:
        config_checks.validate(config, device_count=1, process_count=1)
    assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "field, value",
    [
        ("batch_size", "lots"),
        ("batch_size", 8.0),
        ("batch_size", True),
        ("num_epochs", None),
        ("model.width", "wide"),
        ("model.dropout", None),
        ("augment.flip", 1),
        ("seed", 0.5),
    ],
)
def test_values_of_the_wrong_type_are_refused(field, value):
    config = _tiny_with(field, value)
    (error,) = config_checks.config_errors(config)
    assert error.startswith(f"config.{field}={value!r}: expected ")


def test_several_errors_one_line_each_and_missing_fields():
    config = tiny_config(batch_size=0, num_epochs=0)
    del config.data["val_fraction"]
    errors = config_checks.config_errors(config)
    assert errors == [
        "config.data.val_fraction is missing (every field: configs/default.py)",
        "config.batch_size=0: expected an integer >= 1",
        "config.num_epochs=0: expected an integer >= 1",
    ]
    with pytest.raises(config_checks.ConfigError) as raised:
        config_checks.validate(config, device_count=1, process_count=1)
    assert str(raised.value).splitlines() == errors


def test_what_affectnet_and_imagenet_need():
    config = tiny_config(**{"data.source": "affectnet"})
    (error,) = config_checks.config_errors(config)
    assert "config.data.source='affectnet' needs config.data.dir" in error
    assert "--config.data.source=synthetic" in error
    config.data.dir, config.data.layout = "/data", "csv"
    (error,) = config_checks.config_errors(config)
    assert error.startswith("config.data.layout='csv': expected one of 'auto', ")
    config = tiny_config(**{"model.init": "imagenet"})
    (error,) = config_checks.config_errors(config)
    assert "config.model.init='imagenet' needs the Keras ImageNet weights" in error
    config.model.weights = "/no/such/weights"
    assert config_checks.config_errors(config) == [
        "config.model.weights='/no/such/weights': no such file or directory (expected a "
        "directory written by affect-jax-port-weights or a Keras .h5 file)"
    ]
    # Scoring a saved run restores its weights from the checkpoint.
    assert config_checks.config_errors(config, training=False) == []


def test_loss_weights_cannot_all_be_zero():
    config = tiny_config(**{"loss_weights.classification": 0.0, "loss_weights.regression": 0.0})
    assert config_checks.config_errors(config) == [
        "config.loss_weights: expected at least one of classification, regression, ccc > 0 "
        "(all are 0: nothing would be learnt)"
    ]


def test_per_class_metrics_rank_checkpoints():
    for metric in ("f1_happy", "recall_contempt", "mean_ccc", "valence_rmse", "loss"):
        assert config_checks.config_errors(tiny_config(best_metric=metric)) == [], metric
