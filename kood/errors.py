"""Errors kood raises on bad input (both are ValueErrors, so callers can catch either), and the CLI
helpers that report them."""

from __future__ import annotations

import os
import re
import sys
from typing import Callable, Iterable, Sequence


class DataError(ValueError):
    """A data file, record or dataset directory is missing, corrupt or inconsistent."""


class ConfigError(ValueError):
    """A flag or argument is invalid, or flags do not fit together."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler preempting the job, `kill`), raised like Ctrl-C: every CLI stops the same clean way."""


def interruption(error: KeyboardInterrupt) -> tuple[str, int]:
    """`(what stopped the process, its exit code)`: SIGTERM 143, Ctrl-C 130 (the shells' 128 + signal)."""
    return ("SIGTERM", 143) if isinstance(error, Terminated) else ("Ctrl-C", 130)


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _redeliver_swallowed_interrupts(unraisable) -> None:
    """`sys.unraisablehook` of the CLIs: a Ctrl-C / SIGTERM whose handler ran inside a `__del__` (TensorFlow
    frees traced functions in them all the time) raised there, and Python ignores exceptions from `__del__`
    ("Exception ignored in ..."): the command went on as if no signal had come, to exit 0. Send the signal
    again a moment later, from outside the finalizer; anything else goes to Python's hook."""
    if unraisable.exc_type is not None and issubclass(unraisable.exc_type, KeyboardInterrupt):
        import signal
        import threading

        signum = signal.SIGTERM if issubclass(unraisable.exc_type, Terminated) else signal.SIGINT
        timer = threading.Timer(0.05, os.kill, (os.getpid(), signum))
        timer.daemon = True
        timer.start()
        return
    sys.__unraisablehook__(unraisable)


def quiet_startup_interrupts() -> None:
    """Ctrl-C or SIGTERM while a `python -m kood.X` / `data_prep.X` command is still importing (TensorFlow
    takes several seconds, before `run_app` runs) ends it with one line and exit code 130 / 143, as later on,
    instead of a traceback through the import machinery. Nothing has been written yet then. Called by the
    `kood` and `data_prep` packages while Python imports them as the parent of a `-m` module (`sys.argv[0]`
    is "-m" only then); `run_app` restores the usual handling.
    """
    import signal

    argv = list(getattr(sys, "orig_argv", []))
    prog = next((a[2:] or (argv[i + 1] if i + 1 < len(argv) else "") for i, a in enumerate(argv)
                 if a.startswith("-m")), "") or "kood"

    def stop(signum, frame):
        how, code = ("SIGTERM", 143) if signum == signal.SIGTERM else ("Ctrl-C", 130)
        if _captured_stderr:  # inside import_tensorflow_quietly: fd 2 goes to its file
            os.dup2(_captured_stderr[0], 2)
        try:
            sys.stderr.write(f"{chr(10) if sys.stderr.isatty() else ''}{prog}: interrupted ({how}) while "
                             f"starting; nothing was written\n")
            sys.stderr.flush()
        finally:
            os._exit(code)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)


# TensorFlow's C++ start-up lines, which it prints before absl::InitializeLog whatever TF_CPP_MIN_LOG_LEVEL says;
# with the `tensorflow` wheel on a machine without a GPU driver every command also said "E0000 ... failed call
# to cuInit: ... CUDA error", which reads like a failure.
_STARTUP_NOISE = re.compile(
    r"WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    r"|\] oneDNN custom operations are on\."
    r"|cudart_stub\.cc:\d+\] Could not find cuda drivers on your machine"
    r"|cuda_platform\.cc:\d+\] failed call to cuInit"
    r"|cpu_feature_guard\.cc:\d+\] This TensorFlow binary is optimized"
    r"|^To enable the following instructions: .*rebuild TensorFlow")
_captured_stderr: list[int] = []  # the real fd 2 while import_tensorflow_quietly redirects it


def without_startup_noise(text: str) -> str:
    """`text` without the lines of `_STARTUP_NOISE` (TensorFlow's start-up lines); every other line stays."""
    return "".join(line for line in text.splitlines(keepends=True) if not _STARTUP_NOISE.search(line))


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and finds its devices with fd 2 (where its C++ code writes) sent to a file, then
    writes back all of it but the known start-up lines (`_STARTUP_NOISE`). For the CLIs (the `kood` package
    calls it as the parent of a `-m` module, data_prep's included); a TF_CPP_MIN_LOG_LEVEL the user set
    below 2 shows everything. Listing the physical devices still lets a program configure logical ones."""
    import tempfile

    if os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2") not in ("2", "3"):
        return
    sys.stderr.flush()
    with tempfile.TemporaryFile() as captured:
        _captured_stderr.append(os.dup(2))
        os.dup2(captured.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()
        finally:
            sys.stderr.flush()
            os.dup2(_captured_stderr[0], 2)
            os.close(_captured_stderr.pop())
            captured.seek(0)
            sys.stderr.write(without_startup_noise(captured.read().decode(errors="replace")))
            sys.stderr.flush()


def quiet_info_logs() -> None:
    """Hides TF's absl INFO lines (SavedModel writer, tf.distribute reductions) unless --verbosity is given."""
    from absl import flags
    from absl import logging as absl_logging

    if "verbosity" not in flags.FLAGS or not flags.FLAGS["verbosity"].present:
        absl_logging.set_verbosity(absl_logging.WARNING)


HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull",
              "--helpxml", "-helpxml")


def run_app(main: Callable[[list[str]], object]) -> None:
    """`absl.app.run(main)`, except that a help request exits with code 0 (absl exits 1 after printing help)
    and SIGTERM stops the command like Ctrl-C (`Terminated`), with its cleanup and a one-line message.

    Example:
        if __name__ == "__main__":
            run_app(main)
    """
    import signal

    from absl import app

    signal.signal(signal.SIGINT, signal.default_int_handler)  # was quiet_startup_interrupts' during the imports
    signal.signal(signal.SIGTERM, _raise_terminated)
    sys.unraisablehook = _redeliver_swallowed_interrupts
    sys.argv[1:] = [expand_home(arg) for arg in sys.argv[1:]]
    try:
        app.run(main)
    except SystemExit as e:
        # absl's help flags print the usage and exit 1 while parsing, before `main` runs.
        if e.code == 1 and any(arg in HELP_FLAGS for arg in sys.argv[1:]):
            sys.exit(0)
        raise


def expand_home(arg: str) -> str:
    """`--flag=~/x` -> `--flag=$HOME/x`, also after `NAME=` in lists (`--ood=svhn=~/svhn,...`). The shell expands
    `~` only at the start of a word, so `--out=~/data/x` reached kood as is and a conversion wrote into a
    directory literally named `~` under the working directory."""
    flag, sep, value = arg.partition("=")
    if not (arg.startswith("-") and sep) or "~" not in value:
        return arg
    return flag + sep + re.sub(r"(^|[=,])~(?=/|,|$)", lambda m: m.group(1) + os.path.expanduser("~"), value)


def parse_key_values(items: str | Sequence[str], flag: str, *, typed: bool = True) -> dict:
    """`"a=1,b=x"` or `["a=1", "b=x"]` -> `{"a": 1, "b": "x"}`; a ConfigError names `--flag` on a bad item.

    Args:
        items: one comma-separated string or a list of `key=value` items (absl's DEFINE_list).
        flag: flag name for error messages.
        typed: convert values that read as int, float or true/false (any case); else keep strings.

    Example:
        parse_key_values("width=32,stem=cifar", "arch_kwargs")   # {'width': 32, 'stem': 'cifar'}
    """
    if isinstance(items, str):
        items = items.split(",")
    out = {}
    for item in items:
        if not item.strip():
            continue
        key, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not key:
            raise ConfigError(f"--{flag}: expected key=value items. Received: {item!r}")
        if key in out:
            raise ConfigError(f"--{flag} names {key!r} twice. Received: --{flag}={','.join(items)}")
        out[key] = _typed(value) if typed else value
    return out


def _typed(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(value.lower(), value)


def run_cli(prog: str, argv: Sequence[str], work: Callable[[], object],
            data_dirs: Callable[[], Iterable[str | None]] | None = None) -> None:
    """Runs `work()` for the flags-only CLI `prog`; bad input exits with code 2 and a one-line message.

    A DataError / ConfigError prints `prog: error: <type>: <message>` to stderr without a traceback
    (the message says what to fix). A TensorFlow error from reading a damaged dataset becomes a
    DataError naming the file (`kood.verify.explain_read_error` over `data_dirs()`, the datasets the
    command reads). Ctrl-C prints one line. Any other exception propagates as usual.

    Example:
        def main(argv):
            run_cli("kood.export", argv, lambda: run_from_flags(flags.FLAGS))
    """
    quiet_info_logs()
    try:
        if len(argv) > 1:
            raise ConfigError(f"{prog} takes flags only. Received extra arguments: {list(argv[1:])}")
        work()
    except (ConfigError, DataError) as e:
        print(f"{prog}: error: {type(e).__name__}: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:
        how, code = interruption(e)
        print(f"{chr(10) if sys.stderr.isatty() else ''}{prog}: interrupted ({how})", file=sys.stderr)
        sys.exit(code)
    except Exception as e:
        from kood.verify import explain_read_error, is_read_error

        if not is_read_error(e):
            raise
        error = explain_read_error(e, data_dirs() if data_dirs else [])
        print(f"{prog}: error: DataError: {error}", file=sys.stderr)
        sys.exit(2)


def naming(source: str, directory: str, error: Exception) -> str:
    """`error`'s message prefixed with the flag or role it came through, the directory said once.

    Example:
        naming("--aux_data=", "data/x", DataError("data/x: dataset directory does not exist"))
        # '--aux_data=data/x: dataset directory does not exist'
    """
    message = str(error)
    if message.startswith(f"{directory}: "):
        message = message[len(directory) + 2:]
    return f"{source}{directory}: {message}"


def check_output_dir(path: str, flag: str = "--output") -> None:
    """A DataError before any work if output directory `path`, or the closest of its parents that exists, is a file."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "" if existing == os.path.abspath(path) else f": {existing}"
        raise DataError(f"{flag}={path}{where} is a file, not a directory; pass a directory path")
