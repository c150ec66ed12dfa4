"""``DataError``: the one error every part of the AffectNet package raises for unusable files."""

from affect_jax.errors import UserError


class DataError(UserError, ValueError):
    """The AffectNet files cannot be used as given; the message says what was searched and found."""
