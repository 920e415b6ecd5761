"""argparse types shared by the examples and the benchmarks.

Each checks its value when the command line is parsed, so a bad value stops the script before any
work with argparse's usual message, which names the option (``argument --steps: must be an int of at
least 1, got '0'``), instead of a traceback from deep in a run or a table of nonsense after it.
Beside them, the checks found after parsing (:func:`fail`, :func:`distinct`) and the writers of the
files those options name (:func:`with_folder`, :func:`write_json`), and the scripts' entry point (:func:`run`).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import signal
import sys
import tempfile

import torch


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's defaults in the help, but not where the help already says its default (``default:
    --lr``) or there is none to tell (None): "(default: --lr) (default: None)" said it twice."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def integer(low: int = 1, high: int | None = None):
    """An int in ``[low, high]``: ``type=integer()`` for a count of at least one, ``integer(0)`` for a seed."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be an int {_bounds(low, high)}, got {text!r}")
        return value
    return parse


def real(low: float = -math.inf, high: float = math.inf, *, open_low: bool = False, open_high: bool = False):
    """A finite float in the interval from ``low`` to ``high`` (each end closed unless ``open_*``)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = math.nan
        inside = (low < value if open_low else low <= value) and (value < high if open_high else value <= high)
        if not (inside and math.isfinite(value)):
            ends = ("(" if open_low else "[") + f"{low:g}, {high:g}" + (")" if open_high else "]")
            raise argparse.ArgumentTypeError(f"must be a finite number in {ends}, got {text!r}")
        return value
    return parse


positive = real(0.0, open_low=True)  # a learning rate, a time in seconds
fraction = real(0.0, 1.0, open_low=True, open_high=True)  # a held-out share


def auto_or(parse):
    """``"auto"`` (the library chooses), or what ``parse`` accepts."""
    def parse_auto(text: str):
        return text if text == "auto" else parse(text)
    return parse_auto


def integers(low: int = 1, high: int | None = None):
    """Comma-separated ints, each in ``[low, high]``, at least one."""
    return listing(integer(low, high), f"ints {_bounds(low, high)}")


def listing(parse, what: str = "values"):
    """Comma-separated items, each what ``parse`` accepts, at least one and none empty: a list."""
    def parse_all(text: str) -> list:
        parts = [part.strip() for part in text.split(",")]
        if not all(parts):
            raise argparse.ArgumentTypeError(f"must be comma-separated {what}, got {text!r}")
        return [parse(part) for part in parts]
    return parse_all


def choice(*names: str):
    """One of ``names``, for the items of a :func:`listing` (a single name has ``choices=``)."""
    def parse(text: str) -> str:
        if text not in names:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(names)}, got {text!r}")
        return text
    return parse


def output_path(text: str) -> str:
    """A file to write at the end of a run: refused now if it cannot be created (a folder on the way
    is a file, or the nearest existing one is not writable), rather than after the run. Missing
    folders are created when it is written; ``""`` means none."""
    if not text:
        return text
    _check_folder(os.path.dirname(os.path.abspath(text)), text)
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: it is a folder")
    return text


def with_folder(path: str) -> str:
    """``path``, the folders on the way to it created: what :func:`output_path` promised, for every
    file a script writes (a plot, a checkpoint, a table)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    return path


def write_json(path: str, obj, indent: int = 1) -> None:
    """``obj`` as JSON to ``path`` (:func:`with_folder`), written whole to a file beside it that then
    replaces it: a run stopped mid-write leaves the old file, not a cut one that a later run reads
    back (bench_estimator.py reuses xmc.py's kept dense runs)."""
    temporary = f"{with_folder(path)}.{os.getpid()}.tmp"
    try:
        with open(temporary, "w") as f:
            json.dump(obj, f, indent=indent)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(temporary)
        raise


def results_path(text: str) -> str:
    """:func:`output_path` for a script whose results are what it is run for: ``""`` is refused (it
    wrote the default file)."""
    if not text:
        raise argparse.ArgumentTypeError("must name a file (leave the option out for the default)")
    return output_path(text)


def output_dir(text: str) -> str:
    """A folder to write files into: refused now if it or a folder on the way is a file, or the
    nearest existing one is not writable."""
    _check_folder(os.path.abspath(text), text)
    return text


def device(text: str) -> torch.device:
    """A ``torch.device``: refused now if torch cannot parse it, or it is CUDA where torch has none
    (the run failed at its first tensor)."""
    try:
        value = torch.device(text)
    except RuntimeError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if value.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(f"{text}: torch.cuda.is_available() is False (torch {torch.__version__})")
    return value


def _check_folder(folder: str, text: str) -> None:
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: {folder} is a file")
    # A file made there and gone at once (unnamed, where Linux can): os.access(W_OK) says yes to root in /proc.
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as error:
        raise argparse.ArgumentTypeError(
            f"cannot write {text!r}: {folder} is not writable ({error.strerror})") from None


def apply_quick(parser: argparse.ArgumentParser, argv, args: argparse.Namespace, settings: dict) -> None:
    """With ``args.quick``: ``settings`` (dest -> value, a smaller run's) replace the defaults; one
    of them also given on the command line is refused rather than silently overridden."""
    if not args.quick:
        return
    clash = given(parser, argv, settings)
    if clash:
        names = ", ".join("--" + dest.replace("_", "-") for dest in clash)
        parser.error(f"--quick sets {names} itself: give one or the other, not both")
    vars(args).update(settings)


def run(main) -> None:
    """A script's entry point: an int that ``main()`` returns is the exit status (its results, which the tests
    read, are not); Ctrl-C ends the run with one line and status 130 (the shell's for SIGINT), not a traceback
    from wherever it landed. (Each script writes its files at the end, whole: an interrupted run leaves none
    half-written.)"""
    try:
        status = main()
    except KeyboardInterrupt:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C (or the group's copy of the first) as well
        print(f"\n{os.path.basename(sys.argv[0]) or 'python'}: interrupted", file=sys.stderr)
        status = 130
    sys.exit(status if isinstance(status, int) and not isinstance(status, bool) else 0)


def fail(message: str) -> None:
    """Stop with argparse's kind of message (a bad file or option found after parsing), no traceback."""
    sys.exit(f"{os.path.basename(sys.argv[0]) or 'python'}: error: {message}")


def distinct(parser: argparse.ArgumentParser, option: str, values) -> None:
    """Refuse a value given twice in ``option`` (``--seeds 0 0``: one run counted as two seeds)."""
    repeated = sorted({value for value in values if values.count(value) > 1})
    if repeated:
        parser.error(f"{option} gives {', '.join(map(str, repeated))} more than once")


def given(parser: argparse.ArgumentParser, argv, dests) -> list[str]:
    """Which of the options ``dests`` the command line ``argv`` sets itself (not by default): for
    a switch such as ``--quick`` that sets them, so that it can refuse to override them silently."""
    seen = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests)))  # None: left to its default
    return [dest for dest in dests if getattr(seen, dest) is not None]


def _bounds(low: int, high: int | None) -> str:
    return f"of at least {low}" if high is None else f"in [{low}, {high}]"
