"""``UserError``: a mistake the user can fix (a config value, their files, their data).

The command lines (``cli.run``) print such an error's message, one line per line of it, without
a traceback; any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error whose message tells the user what is wrong and what to do."""
