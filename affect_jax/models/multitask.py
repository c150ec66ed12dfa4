"""Multi-task model: backbone + shared dense neck + expression and valence/arousal heads."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

POOLINGS = ("avg", "max", "flatten")
# Keras's Dense default, as in the study's heads.
_KERNEL_INIT = nnx.initializers.glorot_uniform()


class MultiTaskModel(nnx.Module):
    """Backbone feature map -> pooling -> Dense ReLU neck -> dropout -> two heads.

    The module holds only `nnx.Param` and `nnx.BatchStat` state: dropout draws its keys from the
    call-time `rngs`, so `nnx.split(model, nnx.Param, nnx.BatchStat)` covers everything.

    Args:
      backbone: a no-top backbone (`VGG16` / `ResNet50`) returning [B, h, w, C].
      num_classes: number of expression classes (head `class_output`).
      pooling: 'avg', 'max' or 'flatten' over the last feature map.
      hidden_sizes: widths of the Dense ReLU layers of the neck (may be empty).
      dropout: dropout rate before the heads (training only).
      image_size: square input side; needed for 'flatten' (the neck input size depends on it).
      dtype: compute dtype; parameters are float32 and the outputs are cast to float32.
      rngs: initialisation randomness.
    """

    def __init__(
        self,
        backbone: nnx.Module,
        *,
        num_classes: int,
        pooling: str = "avg",
        hidden_sizes: Sequence[int] = (256,),
        dropout: float = 0.5,
        image_size: int = 224,
        dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if getattr(backbone, "include_top", False):
            raise ValueError("MultiTaskModel needs a backbone built with include_top=False")
        self.backbone = backbone
        self.pooling = pooling
        self.dtype = dtype
        h, w, c = backbone.feature_shape(image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size {image_size} is too small for {backbone.arch}")
        self.feature_shape = (h, w, c)
        self.image_size = image_size
        features = h * w * c if pooling == "flatten" else c
        neck = []
        for size in hidden_sizes:
            if int(size) < 1:
                raise ValueError(f"hidden_sizes must be positive, got {tuple(hidden_sizes)}")
            neck.append(
                nnx.Linear(features, int(size), dtype=dtype, kernel_init=_KERNEL_INIT, rngs=rngs)
            )
            features = int(size)
        self.neck = nnx.List(neck)
        # No rngs stored: keys come from the call-time `rngs` (keeps the state Param+BatchStat).
        self.dropout = nnx.Dropout(dropout)
        self.class_output = nnx.Linear(
            features, num_classes, dtype=dtype, kernel_init=_KERNEL_INIT, rngs=rngs
        )
        self.reg_output = nnx.Linear(features, 2, dtype=dtype, kernel_init=_KERNEL_INIT, rngs=rngs)

    def prepare_inference(self) -> None:
        """Rewrites the parameters, in place, for ``prepared=True`` inference: the backbone's
        BatchNorms folded into its convolutions and its kernels packed for oneDNN, for images
        of side ``image_size`` (the backbones' ``prepare_inference``). Pure in its inputs, so it
        runs inside a jitted step on a merged copy of the state."""
        self.backbone.prepare_inference(self.image_size)

    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool,
        rngs: nnx.Rngs | None = None,
        train_backbone: bool = True,
        prepared: bool = False,
    ) -> dict[str, jax.Array]:
        """Returns {'class_logits': [B, N] float32, 'valence_arousal': [B, 2] float32}.

        ``train_backbone=False`` runs the backbone in inference mode even when ``train`` is set
        (a frozen backbone: its BatchNorm uses and keeps its running statistics, as in Keras).
        ``prepared=True``: inference on parameters ``prepare_inference`` rewrote.
        """
        if prepared and train:
            raise ValueError("prepared=True is inference only (train must be False)")
        use_dropout = train and self.dropout.rate > 0
        if use_dropout and rngs is None:
            raise ValueError(
                "MultiTaskModel(train=True) with dropout > 0 needs rngs, e.g. "
                "model(x, train=True, rngs=nnx.Rngs(dropout=key))"
            )
        if prepared:
            x = self.backbone(images, train=False, folded=True)
        else:
            x = self.backbone(images, train=train and train_backbone)
        if self.pooling == "flatten":
            if tuple(x.shape[1:]) != self.feature_shape:
                raise ValueError(
                    f"pooling='flatten' was built for feature maps {self.feature_shape}, got "
                    f"{tuple(x.shape[1:])} (images of another size than image_size?)"
                )
            x = x.reshape((x.shape[0], -1))
        elif self.pooling == "avg":
            x = jnp.mean(x, axis=(1, 2))
        else:
            x = jnp.max(x, axis=(1, 2))
        for layer in self.neck:
            x = jax.nn.relu(layer(x))
        if use_dropout:
            x = self.dropout(x, deterministic=False, rngs=rngs)
        return {
            "class_logits": self.class_output(x).astype(jnp.float32),
            "valence_arousal": self.reg_output(x).astype(jnp.float32),
        }
