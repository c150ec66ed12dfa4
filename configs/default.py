r"""Default configuration: every field a user can set, with its meaning and default.

Other configs import this one and override a few fields; what each field may hold is checked
when a run starts (affect_jax/config_checks.py). Run with, e.g.::

    python -m affect_jax.main --config=configs/default.py --workdir=/tmp/run \
      --config.data.source=synthetic --config.model.init=random
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Returns the default configuration (the study's settings, with ResNet50)."""
    config = ml_collections.ConfigDict()

    # --- Model -------------------------------------------------------------------------------
    config.model = ml_collections.ConfigDict()
    config.model.name = "resnet50"  # 'resnet50' or 'vgg16' (keras.applications layouts).
    config.model.init = "imagenet"  # 'imagenet' (ported Keras weights) or 'random'.
    # Directory written by affect-jax-port-weights (needed when init='imagenet').
    config.model.weights = ""
    # Channel multiplier of the backbone; 1.0 is the Keras architecture (required for
    # ImageNet weights). Smaller values give tiny models for demos and tests.
    config.model.width = 1.0
    config.model.pooling = "avg"  # Neck: 'avg', 'max' or 'flatten' over the last feature map.
    config.model.hidden_sizes = (256,)  # Dense ReLU layers of the shared neck.
    config.model.dropout = 0.5  # Dropout rate before the heads (train only).
    config.model.freeze_backbone = False  # The study trains every layer.

    # --- Data --------------------------------------------------------------------------------
    config.data = ml_collections.ConfigDict()
    # 'affectnet' (the user's files in data.dir: AffectNet, FER2013, FER+, RAF-DB, a manifest
    # CSV or class folders, any layout in the README) or 'synthetic' (drawn faces).
    config.data.source = "affectnet"
    # Root of the user's files (source='affectnet'), or the manifest/FER2013 CSV file itself.
    config.data.dir = ""
    # Layout: 'auto', 'official', 'npy', 'folders', 'manifest' (AffectNet's and generic ones),
    # 'fer2013', 'ferplus' or 'rafdb'.
    config.data.layout = "auto"
    # Manifest layout: the directory relative image paths start from ('' = the CSV's directory).
    config.data.image_root = ""
    # 8 (with Contempt) or 7 (AffectNet's 7-class protocol; FER2013 and RAF-DB have only 7).
    config.data.num_classes = 8
    config.data.image_size = 224  # Square input side in pixels.
    config.data.val_fraction = 0.2  # Stratified hold-out fraction of the training pool.
    config.data.split_seed = 0  # Seed of the train/validation split (fixed across runs).
    config.data.face_margin = 0.0  # Official layout: extra margin around the face box (fraction).
    # Preprocessing: 'auto' ('caffe' for ImageNet weights, else 'unit'), 'caffe' (Keras:
    # RGB->BGR, minus ImageNet mean, no scaling) or 'unit' (scale to [-1, 1]).
    config.data.preprocessing = "auto"
    config.data.synthetic_size = 4000  # Number of drawn faces (source='synthetic').
    # Fraction of each class's drawn faces kept in the training pool, e.g. (1, 1, 0.2, ...);
    # () keeps all (balanced). For imbalance experiments (source='synthetic').
    config.data.synthetic_class_fractions = ()
    config.data.tfds_data_dir = ""  # Where TFDS prepares AffectNet ('' = TFDS default).
    # Training order: 'shuffle' (every example once per epoch) or 'balanced' (each class drawn
    # equally often, rare classes repeated; epochs keep the training split's length, so
    # steps_per_epoch is unchanged). docs/imbalance.md.
    config.data.sampling = "shuffle"

    # Augmentation (training only; off at evaluation).
    config.augment = ml_collections.ConfigDict()
    config.augment.enabled = False  # The study used none.
    config.augment.flip = True  # Horizontal flip with probability 0.5.
    config.augment.crop_scale = (0.8, 1.0)  # Random resized crop: area fraction range.
    config.augment.rotation_degrees = 10.0  # Maximum absolute rotation.
    config.augment.color_jitter = 0.2  # Brightness/contrast/saturation strength.

    # --- Optimisation ------------------------------------------------------------------------
    config.batch_size = 32  # Global batch size.
    config.eval_batch_size = 64
    config.num_epochs = 20
    config.learning_rate = 1e-4  # Adam learning rate (heads and backbone).
    # Backbone learning rate; a negative value means: same as learning_rate.
    config.backbone_learning_rate = -1.0
    config.adam_b1 = 0.9
    config.adam_b2 = 0.999
    config.adam_epsilon = 1e-7  # Keras's Adam default (optax's is 1e-8).
    config.loss_weights = ml_collections.ConfigDict()
    config.loss_weights.classification = 1.0  # Weight of categorical cross-entropy.
    config.loss_weights.regression = 1.0  # Weight of valence/arousal MSE.
    config.loss_weights.ccc = 0.0  # Weight of (1 - CCC) per dimension (HSEmotion); off.
    # Per-class weights of the cross-entropy, from the training split's class counts: 'none'
    # (the study), 'inverse_frequency' or 'effective_number' (Cui et al. 2019); scaled to an
    # average of 1 per training example; never applied to the regression terms.
    # docs/imbalance.md.
    config.loss_weights.class_weighting = "none"
    config.loss_weights.effective_number_beta = 0.999  # Cui et al.'s beta ('effective_number').

    # --- Numerics and speed --------------------------------------------------------------------
    # 'float32' or 'bfloat16' (params, optimizer and loss stay float32; BatchNorm computes in
    # float32).
    config.compute_dtype = "float32"
    # Activations between layers with compute_dtype='bfloat16': 'compute' (bfloat16, as Keras's
    # mixed_bfloat16: less memory), 'float32' (only the convolutions round), or 'auto'
    # ('compute' for both backbones; VGG16's feature map stays float32). docs/performance.md.
    config.activation_dtype = "auto"
    # Which kernels run the convolutions, the training-mode BatchNorm (ResNet50) and the max
    # pools (VGG16's five, ResNet50's stem): 'auto', 'xla' or 'native'. 'native' is the
    # package's optional C++ extension (affect_jax/ops/native.py; CPU only): oneDNN's
    # convolutions, with Winograd's F(4x4, 3x3) for the float32 3x3 stride-1 ones where it is
    # faster; BatchNorm with the ResNet blocks' residual sum and ReLU fused; max pooling in one
    # pass each way. 'xla' is XLA's own code. 'auto' is 'native' where the extension is built
    # and there is one device per process, else XLA (on CPU with the 1x1 convolutions as
    # matrix products). Same results (float32 round-off apart). docs/performance.md.
    config.conv_impl = "auto"
    config.batch_norm_impl = "auto"
    config.pool_impl = "auto"
    # Training steps per XLA execution (a lax.scan over that many batches; Keras's
    # steps_per_execution); evaluation calls take as many images (a lax.map over
    # evaluation.eval_batches_per_call batches). XLA:CPU maps its temporaries afresh for every
    # execution, so several batches per call save that time (docs/performance.md). Same
    # results as 1 (bit for bit with the oneDNN convolutions; float32 round-off apart with
    # XLA's).
    config.steps_per_execution = 8

    # --- Run ---------------------------------------------------------------------------------
    config.seed = 0  # Model init, dropout and data order.
    # Validation metric that picks the best checkpoint, and whether higher is better (any key
    # of the validation metrics, e.g. 'accuracy', 'balanced_accuracy', 'f1_macro', 'mean_ccc').
    config.best_metric = "mean_ccc"
    config.best_mode = "max"
    config.keep_checkpoints = 2  # Latest checkpoints kept besides the best one.
    config.log_every_steps = 10  # Progress line (with ETA) every N training steps.
    # Cap on training steps per epoch (-1: the whole training split). For smoke tests.
    config.steps_per_epoch = -1
    # Persistent XLA compilation cache, so a resumed run does not recompile ('' = off).
    config.compilation_cache_dir = "~/.cache/affect_jax/xla"
    return config
