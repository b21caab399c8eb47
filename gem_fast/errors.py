"""Errors a user can fix, and the entry-point wrapper that reports them as one line.

Every console entry (``scripts/*.py``, ``gem-fast-*``) wraps its ``main`` in :func:`entry_point`:
a :class:`FatalError` (a :class:`UsageError`: bad argument, file or path; a diverged run) is printed
as ``<prog>: error: <message>`` on stderr and the process exits with the error's ``exit_code``
(2 for usage errors, as argparse does), without a traceback unless ``--debug`` is on the command
line or ``GEM_FAST_DEBUG=1``. The checks here run before any model loads.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import functools
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, TypeVar

__all__ = ["FatalError", "UsageError", "Interrupted", "entry_point", "ArgumentParser", "add_debug_flag", "number",
           "parse_bool", "BOOL_ARG", "user_input", "input_file", "training_data", "output_dir", "writable_file",
           "check_model_source"]

DEBUG_ENV = "GEM_FAST_DEBUG"
DEBUG_FLAG = "--debug"

Main = TypeVar("Main", bound=Callable[..., int])


class FatalError(Exception):
    """An error whose message says everything the user needs: reported as one line, exit ``exit_code``."""

    exit_code = 1


class UsageError(FatalError, ValueError):
    """A bad argument, input file or output path, named in the message with what to do; exit status 2."""

    exit_code = 2


class Interrupted(FatalError):
    """A second Ctrl-C: the run stops at once, keeping its last checkpoint; exit status 130 (128 + SIGINT)."""

    exit_code = 130


def _debug(argv: list[str] | None) -> bool:
    args = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in args or os.environ.get(DEBUG_ENV, "") not in ("", "0")


def entry_point(main: Main) -> Main:
    """Wrap a console ``main(argv=None, ...)``: a :class:`FatalError` becomes one stderr line and
    ``SystemExit(error.exit_code)``; ``--debug`` in argv or ``GEM_FAST_DEBUG=1`` re-raises it instead."""

    @functools.wraps(main)
    def run(argv: list[str] | None = None, *args: Any, **kwargs: Any) -> int:
        try:
            return main(argv, *args, **kwargs)
        except FatalError as exc:
            if _debug(argv):
                raise
            world = int(os.environ.get("WORLD_SIZE", "1"))
            rank = f"[rank {os.environ.get('RANK', '0')}] " if world > 1 else ""
            print(f"{rank}{Path(sys.argv[0]).name}: error: {exc}", file=sys.stderr)
            raise SystemExit(exc.exit_code) from None

    return run  # type: ignore[return-value]


class ArgumentParser(argparse.ArgumentParser):
    """argparse as the scripts use it: no prefix matching (``--gen_max_new_token`` is an unknown flag,
    not ``--gen_max_new_tokens``), an unknown flag named with the closest known one, and every usage
    error as one line ``prog: error: ...`` (exit 2) instead of the whole usage."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{"allow_abbrev": False, **kwargs})

    def error(self, message: str) -> NoReturn:  # type: ignore[override]
        if unknown := re.fullmatch(r"unrecognized arguments: (.*)", message):
            flags = [arg.split("=", 1)[0] for arg in unknown.group(1).split() if arg.startswith("--")]
            message = "; ".join(self._unknown_flag(flag) for flag in flags) or message
            message += " (--help lists the flags)"
        self.exit(2, f"{self.prog}: error: {message}\n")

    def _unknown_flag(self, flag: str) -> str:
        known = [s for action in self._actions for s in action.option_strings if s.startswith("--")]
        close = difflib.get_close_matches(flag, known, n=1)
        return f"unknown flag {flag}" + (f" (did you mean {close[0]}?)" if close else "")


def add_debug_flag(parser: Any) -> None:
    """``--debug`` on an argparse parser (read by :func:`entry_point`; the parsed value is not used)."""
    parser.add_argument(DEBUG_FLAG, action="store_true",
                        help=f"show the traceback of an error instead of one line (or set {DEBUG_ENV}=1)")


def number(kind: type[int] | type[float], *, above: float | None = None, at_least: float | None = None
           ) -> Callable[[str], int | float]:
    """An argparse ``type=``: ``kind(text)`` checked against a bound (argparse then names the flag, exit 2)."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if above is not None and not value > above:
            raise argparse.ArgumentTypeError(f"must be > {above}, got {text}")
        if at_least is not None and not value >= at_least:
            raise argparse.ArgumentTypeError(f"must be >= {at_least}, got {text}")
        return value
    return parse


def parse_bool(text: str) -> bool:
    """true/false, yes/no, on/off, 1/0 (any case) as a bool; argparse's error otherwise."""
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


BOOL_ARG: dict[str, Any] = {"type": parse_bool, "nargs": "?", "const": True, "metavar": "BOOL"}
"""argparse keywords of a boolean flag, the same in every script: ``--flag`` alone is true, and
``--flag true|false`` (yes/no, on/off, 1/0) says it outright."""


@contextlib.contextmanager
def user_input() -> Iterator[None]:
    """Reading a user's data file: its ``ValueError`` (which names the file and line) or ``ImportError``
    (which names the missing library) becomes a :class:`UsageError` with the same message."""
    try:
        yield
    except UsageError:
        raise
    except (ValueError, ImportError) as exc:
        raise UsageError(str(exc)) from exc


def input_file(path: str | Path, flag: str) -> Path:
    """``path`` as an existing readable file; :class:`UsageError` naming ``flag`` and the path otherwise."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"{flag} {path}: no such file")
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, expected a file")
    if not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {path}: not readable (check its permissions)")
    return path


_SHIPPED_DATA = Path(__file__).resolve().parents[1] / "data"  # in a clone (or editable install) of the repository


def training_data(path: str | Path, flag: str) -> Path:
    """:func:`input_file` for a data flag; when it is unset or missing, the message lists the JSONL
    sets the repository ships under ``data/`` (GEM's ``data/synthetic/pairs.jsonl`` among them)."""
    shipped = sorted(str(p.relative_to(_SHIPPED_DATA.parent)) for p in _SHIPPED_DATA.glob("*/*.jsonl"))
    hint = f"the repository ships {', '.join(shipped)}" if shipped else "see the README's Data section"
    if not str(path):
        raise UsageError(f"{flag}: not given; a JSON Lines file of training rows is needed ({hint})")
    if not Path(path).expanduser().exists():
        raise UsageError(f"{flag} {path}: no such file ({hint})")
    return input_file(path, flag)


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _check_creatable(folder: Path, flag: str, path: Path) -> None:
    """:class:`UsageError` (about ``flag`` ``path``) unless ``folder`` exists or can be created and written."""
    existing = _nearest_existing(folder.absolute())
    if not existing.is_dir():
        raise UsageError(f"{flag} {path}: {existing} is a file, not a folder; choose another {flag}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: {existing} is not writable; choose another {flag}")


def output_dir(path: str | Path, flag: str) -> Path:
    """``path`` as a folder that exists or can be created and written; :class:`UsageError` otherwise."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: is a file, expected a folder; choose another {flag}")
    _check_creatable(path, flag, path)
    return path


def writable_file(path: str | Path, flag: str, *, overwrite: bool) -> Path:
    """``path`` as a file that can be written: not a folder, its folder creatable, and absent unless
    ``overwrite`` (then "pass --overwrite" is what the error says); :class:`UsageError` otherwise."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, expected a file name")
    _check_creatable(path.parent, flag, path)
    if path.exists():
        if not overwrite:
            raise UsageError(f"{path}: exists; pass --overwrite to replace it, or choose another {flag}")
        if not os.access(path, os.W_OK):
            raise UsageError(f"{flag} {path}: exists and is not writable")
    return path


_MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".json", ".pt")


def check_model_source(name_or_path: str | Path | None, flag: str = "--model_name_or_path") -> None:
    """:class:`UsageError` at once, naming ``name_or_path``, when it cannot be a model: a local-looking
    path (absolute, ``./``, ``~``, more than one ``/``, a model-file suffix, a parent folder that exists)
    that does not exist, or,
    with ``HF_HUB_OFFLINE``/``TRANSFORMERS_OFFLINE`` set, a Hub id absent from the local cache.
    None (the embedded model) and existing paths pass; a Hub id online is left to transformers."""
    if name_or_path is None:
        return
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.exists():
        return
    # "outputs/sft" looks like a Hub id "org/name", but not when a local folder "outputs" exists.
    local_looking = (path.is_absolute() or text.startswith((".", "~")) or text.count("/") > 1 or "\\" in text
                     or path.suffix in _MODEL_FILE_SUFFIXES or (len(path.parts) > 1 and path.parent.is_dir()))
    if local_looking:
        raise UsageError(f"{flag} {text}: no such file or folder (a Hub id has the form org/name)")
    from huggingface_hub import is_offline_mode, try_to_load_from_cache  # only for a Hub id

    if is_offline_mode() and not isinstance(try_to_load_from_cache(text, "config.json"), str):
        raise UsageError(f"{flag} {text}: not a local folder, and HF_HUB_OFFLINE is set while the Hub cache has no "
                         "copy of it; give a local folder, or download it first (huggingface-cli download)")
