"""Model zoo: Keras-compatible backbones and the multi-task model."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections
from flax import nnx

from affect_jax.models.multitask import POOLINGS, MultiTaskModel
from affect_jax.models.resnet50 import ResNet50
from affect_jax.models.vgg16 import VGG16
from affect_jax.ops.native import check_impl

BACKBONES = ('resnet50', 'vgg16')
COMPUTE_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}
ACTIVATION_DTYPES = ('auto', 'compute', 'float32')
# 'auto': the compute dtype for both. ResNet50's BatchNorm renormalises every layer. VGG16's
# float32 activations did not change its forward pass on oneDNN (the next convolution rounds
# them, ReLU and max pooling commute with the rounding; its feature map stays float32), only
# where the max-pool gradient goes among values that tie once rounded, and cost more
# temporary memory (docs/performance.md).
_AUTO_ACTIVATIONS = {'resnet50': 'compute', 'vgg16': 'compute'}

__all__ = [
    'ACTIVATION_DTYPES', 'BACKBONES', 'COMPUTE_DTYPES', 'MultiTaskModel', 'POOLINGS',
    'ResNet50', 'VGG16', 'activation_dtype', 'create_backbone', 'create_model',
]


def activation_dtype(name: str, compute_dtype: Any, setting: str = 'auto') -> Any:
    """The dtype of backbone `name`'s activations between layers under `setting`.

    'compute': the compute dtype (Keras's `mixed_bfloat16`, PyTorch's autocast); 'float32':
    only the convolutions round to the compute dtype; 'auto': per architecture (above).
    """
    if setting not in ACTIVATION_DTYPES:
        raise ValueError(
            f'config.activation_dtype must be one of {ACTIVATION_DTYPES}, got {setting!r}')
    if setting == 'auto':
        setting = _AUTO_ACTIVATIONS[name]
    return compute_dtype if setting == 'compute' else jnp.float32


def create_backbone(
    name: str,
    include_top: bool = False,
    width: float = 1.0,
    dtype: Any = jnp.float32,
    rngs: nnx.Rngs | None = None,
    **kwargs: Any,
) -> nnx.Module:
    """Builds 'resnet50' or 'vgg16' (extra kwargs, e.g. VGG16's input_size, pass through)."""
    if rngs is None:
        rngs = nnx.Rngs(0)
    if not isinstance(width, (int, float)) or width <= 0:
        raise ValueError(f'model.width must be a number > 0, got {width!r}')
    if name == 'resnet50':
        return ResNet50(include_top, width, dtype=dtype, rngs=rngs, **kwargs)
    if name == 'vgg16':
        return VGG16(include_top, width, dtype=dtype, rngs=rngs, **kwargs)
    raise ValueError(f'model.name must be one of {BACKBONES}, got {name!r}')


def create_model(config: ml_collections.ConfigDict, rngs: nnx.Rngs) -> MultiTaskModel:
    """Builds the MultiTaskModel described by `config.model`, `config.data`, `compute_dtype`."""
    m = config.model
    if m.name not in BACKBONES:
        raise ValueError(f'config.model.name must be one of {BACKBONES}, got {m.name!r}')
    if m.pooling not in POOLINGS:
        raise ValueError(f'config.model.pooling must be one of {POOLINGS}, got {m.pooling!r}')
    if config.compute_dtype not in COMPUTE_DTYPES:
        raise ValueError(
            f'config.compute_dtype must be one of {tuple(COMPUTE_DTYPES)}, '
            f'got {config.compute_dtype!r}'
        )
    hidden = tuple(m.hidden_sizes)
    if not all(isinstance(h, int) and h > 0 for h in hidden):
        raise ValueError(
            f'config.model.hidden_sizes must be positive integers, got {m.hidden_sizes!r}'
        )
    if not 0.0 <= m.dropout < 1.0:
        raise ValueError(f'config.model.dropout must be in [0, 1), got {m.dropout!r}')
    num_classes = config.data.num_classes
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(
            f'config.data.num_classes must be an integer >= 2 (7 or 8 for AffectNet), '
            f'got {num_classes!r}'
        )
    if not isinstance(m.width, (int, float)) or m.width <= 0:
        raise ValueError(f'config.model.width must be a number > 0, got {m.width!r}')
    image_size = int(config.data.get('image_size', 224))
    dtype = COMPUTE_DTYPES[config.compute_dtype]
    impls = {}
    for field in ('conv_impl', 'batch_norm_impl', 'pool_impl'):
        impls[field] = config.get(field, 'auto')
        check_impl(f'config.{field}', impls[field])
    act_dtype = activation_dtype(m.name, dtype, config.get('activation_dtype', 'auto'))
    # VGG16 has no BatchNorm.
    if m.name != 'resnet50':
        del impls['batch_norm_impl']
    backbone = create_backbone(m.name, include_top=False, width=m.width, dtype=dtype,
                               activation_dtype=act_dtype, rngs=rngs, **impls)
    return MultiTaskModel(
        backbone,
        num_classes=num_classes,
        pooling=m.pooling,
        hidden_sizes=hidden,
        dropout=float(m.dropout),
        image_size=image_size,
        dtype=dtype,
        rngs=rngs,
    )
