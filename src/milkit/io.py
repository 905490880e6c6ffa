"""Atomic file writing: an output is either complete or absent, never half-written; and the one reader of
the CSV files users write by hand or in Excel (:func:`read_csv_rows`).

Outputs follow the user's umask (``0o666 & ~umask``), like any file ``open()`` creates: the
temporary file mkstemp makes is 0600 and is chmod-ed before the rename; a file rewritten in
place keeps its existing mode. A full disk is one error naming the file being written.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

#: milkit's temporary files: ``.<name>.<random>.tmp`` beside the output
TMP_PREFIX, TMP_SUFFIX = ".", ".tmp"


class DiskFullError(OSError):
    """No space left (or quota exceeded) while writing ``filename``."""

    def __str__(self) -> str:
        return f"{self.filename}: disk full while writing it (no space left on device); nothing was written"


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode(path: Path) -> int:
    """The mode a new output gets: the existing file's mode, else ``0o666 & ~umask``."""
    try:
        return os.stat(path).st_mode & 0o7777
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed onto ``path``.

    On error the temporary file is removed and ``path`` (if it existed) is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{TMP_PREFIX}{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as err:
        _raise_named(err, path)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        try:
            yield tmp_path
            os.chmod(tmp_path, output_mode(path))
            os.replace(tmp_path, path)
        except OSError as err:
            _raise_named(err, path, tmp_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def _raise_named(err: OSError, path: Path, tmp: Path | None = None) -> None:
    """Re-raise ``err`` naming ``path`` rather than its temporary file; ENOSPC/EDQUOT → DiskFullError."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise DiskFullError(err.errno, os.strerror(err.errno), str(path)) from None
    if err.errno is not None and err.strerror and (tmp is None or err.filename in (None, str(tmp))):
        raise type(err)(err.errno, err.strerror, str(path)) from None
    raise err


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    if hasattr(o, "item"):
        return o.item()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"cannot serialise {type(o).__name__}")


def save_state_dict(path: str | Path, state: dict) -> None:
    import torch

    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_state_dict(path: str | Path) -> dict:
    """Load weights saved by milkit; never unpickles arbitrary objects (``weights_only=True``)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - re-raised with the file named
        detail = " ".join(str(err).split())
        detail = detail if len(detail) <= 160 else detail[:157] + "..."
        raise ValueError(f"{path}: not a readable milkit checkpoint ({type(err).__name__}: {detail})") from None


def write_with(path: str | Path, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def load_npz(path: str | Path, keys: tuple[str, ...], what: str = "") -> tuple:
    """The arrays ``keys`` of an ``.npz`` (no pickles); errors name the file and what is missing."""
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what or '.npz'} file does not exist")
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in keys if k not in z]
            if missing:
                names = " and ".join(f"'{k}'" for k in keys)
                raise ValueError(f"{path}: the .npz must hold arrays {names} (has {sorted(z.files)})")
            return tuple(z[k] for k in keys)
    except (OSError, EOFError) as err:
        raise ValueError(f"{path}: not a readable .npz ({err})") from None


def remove_stale_temps(folder: str | Path, recursive: bool = False, min_age_s: float = 0.0) -> list[Path]:
    """Delete milkit's own leftover temporary files (``.<name>.<random>.tmp``) in ``folder``
    (and below it with ``recursive``), left by a process killed mid-write; only those older than
    ``min_age_s`` seconds, so that a writer still running beside us keeps its file."""
    import time

    now, out = time.time(), []
    pattern = f"{TMP_PREFIX}*{TMP_SUFFIX}"
    for p in Path(folder).rglob(pattern) if recursive else Path(folder).glob(pattern):
        try:
            if p.is_file() and now - p.stat().st_mtime >= min_age_s:
                p.unlink()
                out.append(p)
        except FileNotFoundError:
            pass
    return out


def read_csv_rows(path: str | Path, what: str, note: str = "") -> list[dict[str, str]]:
    """The rows of a CSV a user wrote (slide labels, MPP overrides, image lists), as {column: cell}.

    UTF-8 with or without the byte-order mark Excel writes; the delimiter is the header line's: a tab
    (or a ``.tsv``), a semicolon where the header has no comma (Excel's CSV in locales with a decimal
    comma), else a comma. Column names and cells are stripped of spaces; a missing cell is ``''``.
    ``what`` names the file in errors ("labels CSV"), ``note`` is added to the does-not-exist one.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} does not exist{note}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start}); save the {what} as UTF-8") from None
    lines = text.splitlines()
    header = lines[0] if lines else ""
    if "\t" in header or path.suffix.lower() == ".tsv":
        delimiter = "\t"
    else:
        delimiter = ";" if ";" in header and "," not in header else ","
    reader = csv.DictReader(lines, delimiter=delimiter)
    return [{k.strip(): (v or "").strip() for k, v in row.items() if k is not None} for row in reader]
