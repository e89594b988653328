"""Checks on files we read, and writes that never leave a half-written result behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path


from ..errors import AccuQuantError


@contextlib.contextmanager
def _write_errors_as_oserror(path: Path):
    """A failed write (a full disk) as an ``OSError`` naming the output: safetensors reports it
    as its own exception type, and a full disk's ``OSError`` names no file."""
    try:
        yield
    except OSError as e:
        raise OSError(e.errno, f"{path}: cannot write ({e.strerror or e})") from None
    except Exception as e:
        if type(e).__name__ != "SafetensorError":
            raise
        raise OSError(f"{path}: cannot write ({str(e).strip().splitlines()[0]})") from None


def _fsync(path: Path) -> None:
    """Flush a written file, or a directory's entries, to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temp_prefix(name: str) -> str:
    """Temporaries carry their writer's process id, so that a later run can tell the
    leftovers of a killed writer from the files a live one is still writing."""
    return f".{name}.{os.getpid()}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(path: Path) -> None:
    """Remove the temporaries that a killed writer left beside ``path`` (those of live
    processes, such as a second run sharing the cache, are left alone)."""
    path = Path(path)
    if not path.parent.is_dir():
        return
    for p in path.parent.glob(f".{glob_escape(path.name)}.*"):
        pid = p.name[len(path.name) + 2:].split(".", 1)[0]
        if p.name.endswith((".tmp", ".old")) and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


@contextlib.contextmanager
def atomic_path(path: Path):
    """Yield a temporary file path beside ``path``; it replaces ``path`` only on success, once
    flushed to the disk (a crash leaves the old file or the new one, never a part)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        with _write_errors_as_oserror(path):
            yield Path(tmp)
        _fsync(Path(tmp))
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def check_writable(out: Path) -> None:
    """Refuse, before any work, an output path that cannot be created: its nearest existing
    parent is not a directory, or nothing can be written there."""
    parent = Path(out).absolute().parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise AccuQuantError(f"{out}: {parent} is not a directory")
    try:
        tempfile.TemporaryDirectory(prefix=".accuquant-probe-", dir=parent).cleanup()
    except OSError as e:
        raise AccuQuantError(f"{out}: cannot write in {parent} ({e.strerror or e})") from None


def check_not_inside(out, source) -> None:
    """Refuse, before any work, an output path that would replace or write into the model
    being read: ``out`` is ``source``'s directory, lies inside it, or contains it (symbolic
    links resolved; ``bundled:NAME`` is its asset directory). A ``source`` that is not a local
    path (a hub id, an in-memory model, ``None``) is not checked."""
    from ..bundled import real_path, resolve_ref

    if not isinstance(source, (str, os.PathLike)):
        return
    src = Path(resolve_ref(str(source)))
    if not src.exists():
        return
    src, dst = real_path(src), real_path(out)
    if dst == src:
        where = "is"
    elif src in dst.parents:
        where = "lies inside"
    elif dst in src.parents:
        where = "contains"
    else:
        return
    raise AccuQuantError(f"{out}: the output {where} the input model {source}; write it elsewhere")


def check_out_dir(out: Path, overwrite: bool, overwrite_name: str = "overwrite=True") -> None:
    """Refuse an output directory that exists and is not empty, unless ``overwrite``
    (``overwrite_name``: how the caller's user asks for it, such as the command line's flag)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise AccuQuantError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AccuQuantError(f"{out}: directory exists and is not empty (pass {overwrite_name} to replace it)")
    check_writable(out)


@contextlib.contextmanager
def atomic_dir(out: Path, overwrite: bool = False):
    """Yield a temporary directory beside ``out``; it becomes ``out`` only on success."""
    out = Path(out)
    check_out_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".tmp", dir=out.parent))
    try:
        with _write_errors_as_oserror(out):
            yield tmp
        for f in sorted(tmp.rglob("*"), reverse=True):  # files, then their directories
            _fsync(f)
        _fsync(tmp)
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(out.name), suffix=".old", dir=out.parent))
            os.replace(out, old / "x")
            try:
                os.replace(tmp, out)
            except OSError:
                os.replace(old / "x", out)  # put the old output back
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
        _fsync(out.parent)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
