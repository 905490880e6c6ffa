"""Test-only (tests/distributed): which process changes files under a run directory.

When ``MILKIT_TRACE_ROOT`` and ``MILKIT_TRACE_DIR`` are set, every Python process started with
this folder on ``PYTHONPATH`` (Lightning's DDP ranks inherit it) records, through an audit
hook, each file it opens for writing, creates, renames or removes under the root, in
``MILKIT_TRACE_DIR/<pid>.tsv`` as ``rank<TAB>event<TAB>path``. The first line names the rank the
launcher gave the process at start (``LOCAL_RANK``/``RANK``; rank 0 has neither).
"""

import os
import sys

_ROOT = os.environ.get("MILKIT_TRACE_ROOT")
_OUT = os.environ.get("MILKIT_TRACE_DIR")

if _ROOT and _OUT:
    _root = os.path.abspath(_ROOT)
    _start_rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
    _busy = [False]
    _fd = os.open(os.path.join(_OUT, f"{os.getpid()}.tsv"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.write(_fd, f"{_start_rank}\tstart\t{' '.join(sys.argv)[:200]}\n".encode())
    _WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def _under(path) -> str | None:
        if isinstance(path, bytes):
            path = os.fsdecode(path)
        if not isinstance(path, (str, os.PathLike)):
            return None
        p = os.path.abspath(os.fspath(path))
        return p if p == _root or p.startswith(_root + os.sep) else None

    def _hook(event, args):
        if _busy[0]:
            return
        paths = []
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE)
            if writing:
                paths = [path]
        elif event in ("os.rename", "os.link", "os.symlink"):
            paths = [args[1]]
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
            paths = [args[0]]
        for p in paths:
            q = _under(p)
            if q is None:
                continue
            _busy[0] = True
            try:
                rank = os.environ.get("RANK") or os.environ.get("LOCAL_RANK") or "0"
                os.write(_fd, f"{rank}\t{event}\t{q}\n".encode())
            finally:
                _busy[0] = False

    sys.addaudithook(_hook)
