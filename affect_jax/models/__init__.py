"""Model zoo: Keras-compatible backbones and the multi-task model."""

from __future__ import annotations

import itertools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from affect_jax.models import resnet50, vgg16
from affect_jax.models.multitask import POOLINGS, MultiTaskModel
from affect_jax.models.resnet50 import ResNet50
from affect_jax.models.vgg16 import VGG16

BACKBONES = ("resnet50", "vgg16")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATION_DTYPES = ("auto", "compute", "float32")
# 'auto': the compute dtype for both. ResNet50's BatchNorm renormalises every layer. VGG16's
# float32 activations did not change its forward pass on oneDNN (the next convolution rounds
# them, ReLU and max pooling commute with the rounding; its feature map stays float32), only
# where the max-pool gradient goes among values that tie once rounded, and cost more
# temporary memory (docs/performance.md).
_AUTO_ACTIVATIONS = {"resnet50": "compute", "vgg16": "compute"}
_BACKBONE_CLASSES = {"resnet50": ResNet50, "vgg16": VGG16}
_FEATURE_SIDES = {"resnet50": resnet50.feature_side, "vgg16": vgg16.feature_side}

__all__ = [
    "ACTIVATION_DTYPES",
    "BACKBONES",
    "COMPUTE_DTYPES",
    "InitKeys",
    "MultiTaskModel",
    "POOLINGS",
    "ResNet50",
    "VGG16",
    "activation_dtype",
    "create_backbone",
    "create_model",
    "min_image_size",
]


class InitKeys:
    """The ``params`` keys of ``nnx.Rngs(params=seed)`` in the same order, so the same
    parameters, for building a model inside a trace (``steps.init_model``'s one program, the
    abstract models checkpoints are restored into).

    Why not ``nnx.Rngs`` there: its stream counter is a variable, and each traced update of it
    asks the tracer for a sharding, whose error message JAX builds by walking the whole program
    traced so far: quadratic in the model's size (seconds for ResNet50). Here the counter is a
    Python int.
    """

    def __init__(self, seed: int):
        self._key = jax.random.key(seed)
        self._count = 0

    def params(self) -> jax.Array:
        key = jax.random.fold_in(self._key, self._count)
        self._count += 1
        return key


def activation_dtype(name: str, compute_dtype: Any, setting: str = "auto") -> Any:
    """The dtype of backbone `name`'s activations between layers under `setting`.

    'compute': the compute dtype (Keras's `mixed_bfloat16`, PyTorch's autocast); 'float32':
    only the convolutions round to the compute dtype; 'auto': per architecture (above).
    """
    if setting == "auto":
        setting = _AUTO_ACTIVATIONS[name]
    return compute_dtype if setting == "compute" else jnp.float32


def min_image_size(name: str) -> int:
    """The smallest square input side for which backbone `name` leaves a feature map."""
    return next(size for size in itertools.count(1) if _FEATURE_SIDES[name](size) >= 1)


def create_backbone(
    name: str,
    include_top: bool = False,
    width: float = 1.0,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Builds 'resnet50' or 'vgg16' (extra kwargs, e.g. VGG16's input_size, pass through)."""
    if name not in _BACKBONE_CLASSES:
        raise ValueError(f"backbone {name!r} is not one of {BACKBONES}")
    return _BACKBONE_CLASSES[name](
        include_top, width, dtype=dtype, rngs=rngs or nnx.Rngs(0), **kwargs
    )


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs | InitKeys) -> MultiTaskModel:
    """Builds the MultiTaskModel described by `config.model`, `config.data`, `compute_dtype`
    (a config that `config_checks.validate` accepted)."""
    m = config.model
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    impls = {
        field: config.get(field, "auto") for field in ("conv_impl", "batch_norm_impl", "pool_impl")
    }
    act_dtype = activation_dtype(m.name, dtype, config.get("activation_dtype", "auto"))
    # VGG16 has no BatchNorm.
    if m.name != "resnet50":
        del impls["batch_norm_impl"]
    backbone = create_backbone(
        m.name,
        include_top=False,
        width=m.width,
        dtype=dtype,
        activation_dtype=act_dtype,
        rngs=rngs,
        **impls,
    )
    return MultiTaskModel(
        backbone,
        num_classes=config.data.num_classes,
        pooling=m.pooling,
        hidden_sizes=tuple(m.hidden_sizes),
        dropout=float(m.dropout),
        image_size=int(config.data.get("image_size", 224)),
        dtype=dtype,
        rngs=rngs,
    )
