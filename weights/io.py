"""File I/O every layer above shares: atomic writes of one file or of a directory, and JSON / JSONL readers
whose errors name the file (and line). Readers raise `error(message)`, so each caller keeps its own
exception type (CheckpointError, AdapterError, DataError, ...)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any


def atomic_write(path: str | os.PathLike[str], data: str | bytes | Callable[[Path], None]) -> Path:
    """Replace `path` with `data` (text, bytes, or a writer called with a temp path beside it) in one rename:
    readers see the old file or the new one, never part of one. The file is 0644 like any other."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(data, str):
                f.write(data.encode("utf-8"))
            elif isinstance(data, bytes):
                f.write(data)
        if callable(data):
            data(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _old(target: Path) -> Path:
    return target.with_name(f".{target.name}.old")


def atomic_dir(target: str | os.PathLike[str], write: Callable[[Path], None]) -> Path:
    """Fill a temp directory beside `target` with `write(tmp)`, then swap it in (target -> .old, temp ->
    target, .old removed): a crash leaves the old directory or the new one, never a mix of the two. After a
    crash between the two renames only `.TARGET.old` exists: `find_dir` returns it."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    try:
        write(tmp)
        os.chmod(tmp, 0o755)  # mkdtemp makes 0700
        old = _old(target)
        if target.exists():
            if not target.is_dir():
                raise NotADirectoryError(f"{target}: exists and is not a directory")
            shutil.rmtree(old, ignore_errors=True)  # stale: the target is whole
            os.replace(target, old)
        os.replace(tmp, target)  # only now may a leftover .old (the last whole copy after a crash) go
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def find_dir(target: str | os.PathLike[str], marker: str) -> Path | None:
    """`target` if it holds `marker`, else the `.old` copy `atomic_dir` leaves after a crash mid-swap, else None."""
    target = Path(target)
    for d in (target, _old(target)):
        if (d / marker).is_file():
            return d
    return None


def read_json(path: str | os.PathLike[str], error: Callable[[str], Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from `path`; any problem raises error('PATH: ...') in one line."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{path}: not found") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({brief(e)})") from None
    except ValueError as e:  # bad JSON, or bytes that are not UTF-8
        raise error(f"{path}: not valid JSON ({brief(e)})") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def read_jsonl(
    path: str | os.PathLike[str],
    error: Callable[[str], Exception] = ValueError,
    check: Callable[[Any], None] | None = None,
    skip_bad: bool = False,
    hint: str = "",
) -> tuple[list[tuple[str, dict[str, Any]]], list[str]]:
    """([("PATH:LINE", object)], [messages of skipped lines]) for the non-blank lines of a JSON Lines file.
    A line that is not UTF-8 JSON, or not an object (or that `check(value)`, when given, rejects with a
    ValueError), raises error("PATH:LINE: what is wrong" + hint), or is skipped and reported when `skip_bad`."""
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {'not a file' if path.exists() else 'no such file'}")
    rows: list[tuple[str, dict[str, Any]]] = []
    skipped: list[str] = []
    with path.open("rb") as f:
        for n, raw in enumerate(f, start=1):
            where = f"{path}:{n}"
            try:
                value = _parse_line(raw)
                if value is None:
                    continue
                if check is not None:
                    check(value)
                elif not isinstance(value, dict):
                    raise ValueError(f"expected a JSON object, got {type(value).__name__}")
            except ValueError as e:
                if not skip_bad:
                    raise error(f"{where}: {brief(e, 200)}{hint}") from None
                skipped.append(f"{where}: {brief(e, 200)}")
                continue
            rows.append((where, value))
    return rows, skipped


def _parse_line(raw: bytes) -> Any:
    """One line's JSON value, None for a blank line; a ValueError says what is wrong."""
    try:
        line = raw.decode("utf-8").strip()
    except UnicodeDecodeError as e:
        raise ValueError(f"not valid UTF-8 ({e})") from None
    if not line:
        return None
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"not valid JSON ({e})") from None


def brief(e: BaseException, limit: int = 80) -> str:
    """A library's error as a short phrase: its first line, clipped (some run to kilobytes)."""
    line = _first_line(e)
    return line if len(line) <= limit else line[: limit - 1] + "…"


def _first_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return lines[0] if lines else type(e).__name__
