"""Helpers for CLI error tests: run ``peftkit`` in-process, take the one error line, snapshot folders."""

from __future__ import annotations

from pathlib import Path

from peftkit.cli import main


def cli(*argv) -> int:
    """``peftkit argv...`` in this process; the exit status (argparse's SystemExit included)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def error_line(capsys, *argv, status: int = 2) -> str:
    """Run ``peftkit argv...``, check the exit status and that stderr is exactly one line; return it."""
    assert cli(*argv) == status
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1, err
    return lines[0]


def snapshot(root: str | Path) -> dict[str, bytes | None]:
    """Every path under ``root`` (hidden ones too) with its bytes (None for folders)."""
    root = Path(root)
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}
