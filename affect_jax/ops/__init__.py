"""Custom operations (fast CPU convolution paths)."""
