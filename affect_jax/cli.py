"""Running a command-line program: user mistakes in one line, exit codes, a quiet console.

``run(main)`` replaces ``absl.app.run(main)`` for ``affect_jax.main``, ``predict`` and ``export``:

- exit code 2: the command line is wrong (an unknown flag or config field, a bad flag value, a
  missing required flag, a config file that cannot be loaded), in one line;
- exit code 1: a user error (``errors.UserError``: a bad config value, unusable data; a missing
  file or directory; a full disk, named with what to do), in one line per line of its message;
- any other exception is a bug: Python prints its traceback (exit code 1).

``--traceback`` shows the traceback of user errors too. The console follows ``console``.
A command that only reads (``predict``) may end without the interpreter's teardown
(``skip_teardown``): TensorFlow's takes over a second after the last result is written.
"""

from __future__ import annotations

import atexit
import errno
import os
import sys
from collections.abc import Callable, Iterator, Sequence

from absl import app, flags, logging

from affect_jax import console
from affect_jax.errors import UserError

FLAGS = flags.FLAGS
USAGE = 2
FAILURE = 1
# Missing or unusable files and directories the user named.
FILE_ERRORS = (
    FileNotFoundError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
    FileExistsError,
)
NO_SPACE = "No space left on device"


def _chain(error: BaseException) -> Iterator[BaseException]:
    """``error`` and the exceptions it was raised from or while handling."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        yield error
        error = error.__cause__ or error.__context__


def _no_space_path(error: BaseException) -> str | None:
    """The file being written when the disk filled up ('' if unknown), or None."""
    for e in _chain(error):
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            return e.filename or ""
        if NO_SPACE in str(e):
            return ""
    return None


def user_error_message(error: BaseException, output_flag: str | None = None) -> str | None:
    """What to print for a user error (possibly several lines), or None for a bug.

    ``output_flag``: the flag naming where the program writes, suggested when the disk is full.
    """
    path = _no_space_path(error)
    if path is not None:
        where = path or (FLAGS[output_flag].value if output_flag and output_flag in FLAGS else "")
        advice = f" or pass another --{output_flag}" if output_flag else ""
        return (
            f"no space left on device{f' writing {where}' if where else ''}: free some "
            f"space{advice}"
        )
    for e in _chain(error):
        if isinstance(e, UserError):
            return str(e)
        if e is error and isinstance(e, FILE_ERRORS):
            return str(e)
        if e.__cause__ is None:  # only explicit wrapping (raise ... from) is followed
            break
    return None


def _unknown_field_message(error: BaseException, argv: Sequence[str]) -> str | None:
    """One line for ``--config.no_such_field=...``, which ml_collections fails on."""
    key = str(error).strip("'\"")
    overrides = [
        a
        for a in argv
        if a.lstrip("-").split("=")[0].split(".")[0] in _config_flag_names()
        and "." in a.split("=")[0]
    ]
    for arg in overrides:
        path = arg.lstrip("-").split("=")[0].split(".")
        if key in path:
            return f"{arg}: the config has no field {key!r}"
    return None


def _config_flag_names() -> list[str]:
    from ml_collections.config_flags import config_flags

    return [
        name for name, flag in FLAGS._flags().items() if isinstance(flag, config_flags._ConfigFlag)
    ]


def _config_file_message(name: str, argv: Sequence[str]) -> str | None:
    """One line if config flag ``name``'s file could not be loaded."""
    try:
        FLAGS[name].value.keys()  # raises the stored load error
    except OSError as e:
        return _load_error_message(name, argv, e)
    except AttributeError:
        return None
    return None


def _load_error_message(name: str, argv: Sequence[str], error: OSError) -> str:
    given = next((a.split("=", 1)[1] for a in argv if a.lstrip("-").startswith(f"{name}=")), "")
    if given and not os.path.exists(given.split(":")[0]):
        return f"--{name}={given}: no such file"
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"--{name}={given}: could not be loaded ({lines[-1] if lines else error})"


def _usage_error(message: str, hint: str = "--helpfull lists the flags") -> None:
    sys.stderr.write(f"error: {message} ({hint})\n")
    sys.exit(USAGE)


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing, with the command line's mistakes as one line and exit code 2."""
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        _usage_error(str(e))
    except OSError as e:  # a config file that did not load, met by an override
        names = [
            n for n in _config_flag_names() if any(a.lstrip("-").startswith(f"{n}=") for a in argv)
        ]
        if not names:
            raise
        _usage_error(_load_error_message(names[0], argv, e))
    except (AttributeError, KeyError) as e:
        message = _unknown_field_message(e, argv)
        if message is None:
            raise
        _usage_error(message, "configs/default.py lists every field")
    for name in _config_flag_names():
        message = _config_file_message(name, argv)
        if message:
            _usage_error(message)
    return rest


def _define_flags() -> None:
    if "traceback" not in FLAGS:
        flags.DEFINE_bool(
            "traceback",
            False,
            "Show the Python traceback of user errors (a bad "
            "config value, unusable data, a missing file) too.",
        )


def guard(
    main: Callable[[list[str]], int | None], output_flag: str | None = None
) -> Callable[[list[str]], int | None]:
    """``main`` with user errors printed as lines (exit code 1) and usage errors in one line
    (exit code 2); other exceptions keep their traceback."""

    def guarded(argv: list[str]) -> int | None:
        console.setup()
        try:
            return main(argv)
        except app.UsageError as e:
            _usage_error(str(e))
        except Exception as e:  # user errors are told apart from bugs below
            message = user_error_message(e, output_flag)
            if message is None or FLAGS.traceback:
                raise
            for line in message.splitlines():
                logging.error("%s", line)
            return FAILURE

    return guarded


def exit_without_teardown(code: int | None) -> None:
    """Ends the process with ``code`` after the exit handlers (``atexit``: logging's flush
    among them) and a flush of stdout and stderr, but without the interpreter's teardown of
    modules and without waiting for non-daemon threads."""
    atexit._run_exitfuncs()  # what the interpreter runs first at exit; os._exit skips it
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: nothing more can reach it
            pass
    os._exit(0 if code is None else code)


def run(
    main: Callable[[list[str]], int | None],
    output_flag: str | None = None,
    skip_teardown: bool = False,
) -> None:
    """``absl.app.run(main)`` with the behaviour above; ``output_flag`` names the flag of where
    the program writes (suggested when the disk is full). With ``skip_teardown`` a program that
    returned an exit code ends by ``exit_without_teardown``: only for programs that leave no
    work in non-daemon threads (a traceback still ends the normal way)."""
    console.quiet_native_logs()
    _define_flags()
    try:
        app.run(guard(main, output_flag), flags_parser=parse_flags)
    except SystemExit as e:
        if skip_teardown and (e.code is None or isinstance(e.code, int)):
            exit_without_teardown(e.code)
        raise


def console_script(
    define_flags: Callable[[], None],
    main: Callable[[list[str]], int | None],
    output_flag: str | None = None,
    skip_teardown: bool = False,
) -> Callable[[], None]:
    """A command's entry point (``[project.scripts]``): defines its flags only when it runs
    (absl flags are process-wide), then ``run(main, output_flag, skip_teardown)``."""

    def entry_point() -> None:
        define_flags()
        run(main, output_flag, skip_teardown)

    return entry_point
