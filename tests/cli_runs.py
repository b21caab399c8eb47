"""The training scripts' entry run in-process, and the one-line user error a CLI prints before it exits."""

from __future__ import annotations

import pytest

from gem_fast import cli


def one_line_error(capsys, code: int, call) -> str:
    """Run ``call``, expect SystemExit(code), no traceback and the error as stderr's last line; return that line."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    assert exit_info.value.code == code
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err, err
    last = err.splitlines()[-1]
    assert ": error: " in last, err
    return last


def train_sft(argv: list[str]) -> int:
    """``scripts/train_sft.py`` with ``argv``, in this process; its exit code."""
    return cli.main(argv, objective="sft", description="t")


def train_sega(argv: list[str]) -> int:
    """``scripts/train_sega.py`` with ``argv``, in this process; its exit code."""
    return cli.main(argv, objective="sega", description="t")
