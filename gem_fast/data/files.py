"""Rows of dataset files, each with its location for error messages: ``path:line`` (1-based) for
JSON Lines, ``path[index]`` (0-based) otherwise.

JSON Lines (``.jsonl``, or a ``.json`` file that does not start with ``[``), JSON (a ``.json``
list of rows), Parquet (``.parquet``, via pyarrow) and folders written by Hugging Face
``datasets``' ``save_to_disk`` (needs the ``datasets`` library). The one JSON Lines reader,
:func:`jsonl_rows`, serves :func:`gem_fast.data.records.load_preference_jsonl` and :func:`iter_rows`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any, TextIO

__all__ = ["Row", "open_text", "check_utf8", "jsonl_rows", "iter_rows"]

Row = Mapping[str, Any]


def open_text(path: Path) -> TextIO:
    """A UTF-8 text handle on ``path`` whose bad bytes arrive as lone surrogates, for :func:`check_utf8`
    to report with their line (a plain UTF-8 handle raises without saying where)."""
    return path.open(encoding="utf-8", errors="surrogateescape")


def check_utf8(text: str, where: str, first_line: int = 1) -> None:
    """``ValueError`` ``where:line: not UTF-8 ...`` if ``text`` (read by :func:`open_text`) held a byte
    that is not UTF-8; ``first_line`` is the file line that ``text`` starts on."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        line = first_line + text.count("\n", 0, err.start)
        column = err.start - (text.rfind("\n", 0, err.start) + 1) + 1
        byte = ord(text[err.start]) - 0xDC00
        raise ValueError(f"{where}:{line}: not UTF-8 (byte 0x{byte:02x} at column {column}); "
                         "re-save the file as UTF-8") from None


def jsonl_rows(handle: TextIO, path: Path) -> Iterator[tuple[str, Any]]:
    """Each non-blank line of a JSON Lines file opened with :func:`open_text` as (``"path:line"``,
    parsed value), lazily; ``ValueError`` with ``path:line`` on a byte that is not UTF-8 or invalid JSON."""
    for line_no, line in enumerate(handle, start=1):
        check_utf8(line, str(path), line_no)
        if not line.strip():
            continue
        try:
            yield f"{path}:{line_no}", json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}:{line_no}: invalid JSON ({err.msg})") from None


def iter_rows(path: str | Path, *, split: str | None = None) -> Iterator[tuple[str, Row]]:
    """Yield ``(location, row)`` for every row of a JSONL/JSON/Parquet file or a datasets folder.

    ``split`` names the split of a saved ``DatasetDict`` (needed when it holds several).
    Raises ``ValueError`` naming the file (and row) for unreadable content or a row that is
    not an object, ``ImportError`` naming the library a Parquet file or datasets folder needs.
    """
    path = Path(path)
    if split is not None and not path.is_dir():
        raise ValueError(f"{path}: split={split!r} applies to datasets folders only")
    if path.is_dir():
        rows = _datasets_rows(path, split)
    elif path.suffix == ".parquet":
        rows = _parquet_rows(path)
    elif path.suffix in (".jsonl", ".json"):
        rows = _json_rows(path)
    else:
        raise ValueError(
            f"{path}: unsupported file type {path.suffix!r}; "
            "expected .jsonl, .json, .parquet or a folder saved by datasets' save_to_disk"
        )
    for where, row in rows:
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: expected an object with named fields, got {type(row).__name__}")
        yield where, row


def _json_rows(path: Path) -> Iterator[tuple[str, Any]]:
    with open_text(path) as handle:
        # `datasets`' to_json writes JSON Lines under a .json name, so the content decides.
        if path.suffix == ".json" and _first_char(handle) == "[":
            text = handle.read()
            check_utf8(text, str(path))
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}: invalid JSON at line {err.lineno} ({err.msg})") from None
            for index, row in enumerate(rows):
                yield f"{path}[{index}]", row
            return
        yield from jsonl_rows(handle, path)


def _first_char(handle: TextIO) -> str:
    """The first non-whitespace character ('' if none); leaves the handle at the start."""
    char = handle.read(1)
    while char.isspace():
        char = handle.read(1)
    handle.seek(0)
    return char


def _parquet_rows(path: Path) -> Iterator[tuple[str, Any]]:
    parquet = _import("pyarrow.parquet", path, "a Parquet file")
    try:
        batches = parquet.ParquetFile(path).iter_batches(batch_size=1024)
    except ValueError as err:  # pyarrow's ArrowInvalid, whose message lacks the path
        raise ValueError(f"{path}: not a readable Parquet file ({err})") from None
    rows = (row for batch in batches for row in batch.to_pylist())
    for index, row in enumerate(rows):
        yield f"{path}[{index}]", row


def _datasets_rows(path: Path, split: str | None) -> Iterator[tuple[str, Any]]:
    if not ((path / "state.json").is_file() or (path / "dataset_dict.json").is_file()):
        raise ValueError(
            f"{path}: a folder, but not one saved by datasets' save_to_disk "
            "(no state.json or dataset_dict.json)"
        )
    datasets = _import("datasets", path, "a Hugging Face datasets folder")
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, Mapping):  # a DatasetDict (a dict subclass) of named splits
        if split is None and len(loaded) == 1:
            split = next(iter(loaded))
        if split not in loaded:
            raise ValueError(f"{path}: choose a split with split=, one of {sorted(loaded)} (got {split!r})")
        loaded, where = loaded[split], f"{path}[{split}]"
    elif split is not None:
        raise ValueError(f"{path}: holds a single dataset, not splits; got split={split!r}")
    else:
        where = str(path)
    for index, row in enumerate(loaded):
        yield f"{where}[{index}]", row


def _import(module: str, path: Path, what: str) -> ModuleType:
    try:
        return importlib.import_module(module)
    except ImportError:
        library = module.split(".")[0]
        raise ImportError(
            f"{path}: reading {what} needs the {library!r} library, which is not installed "
            f"(pip install {library})"
        ) from None
