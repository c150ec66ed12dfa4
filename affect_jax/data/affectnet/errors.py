"""``DataError``: the one error every part of the AffectNet package raises for unusable files."""


class DataError(ValueError):
    """The AffectNet files cannot be used as given; the message says what was searched and found."""
