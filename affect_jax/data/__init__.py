"""Data sources (synthetic, AffectNet) and the tf.data input pipeline."""
