"""Convolutions, BatchNorm and max pooling by XLA or by the optional C++ extension (`native`)."""
