"""Output files and folders: checked before the work, written atomically after it, with the user's umask.

Every command that writes ``--out`` follows the same protocol:

1. :func:`check_out` before any work: an existing ``out`` is refused unless ``force``; ``out`` equal to, inside
   or containing one of the command's inputs is refused even with ``force`` (replacing it would delete or modify
   the input); the parent folder must be writable.
2. The result is written to a temporary sibling (:func:`staged_dir` / :func:`staged_file`: ``.NAME.tmp-XXXX``),
   which is removed on any failure, interruption included.
3. :func:`commit` swaps it in with SIGINT and SIGTERM held back, so ``out`` is either the old one, or absent, or
   the complete new one; never half of either.

Temporary names come from ``mkdtemp`` / ``mkstemp``, which create mode 0700 / 0600; the finished output gets the
modes a plain ``mkdir`` / ``open`` would have given (0777 / 0666 less the umask).
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

PathLike = Union[str, os.PathLike]


class OutputError(ValueError):
    """``--out`` cannot be used: it overlaps an input or cannot be written (an existing one raises
    :class:`FileExistsError`)."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _chmod_tree(root: Path) -> None:
    """Give ``root`` and everything below it the modes of a plain ``mkdir`` / ``open`` under the umask."""
    mask = _umask()
    dir_mode, file_mode = 0o777 & ~mask, 0o666 & ~mask
    if root.is_dir():
        for folder, dirs, files in os.walk(root):
            os.chmod(folder, dir_mode)
            for name in files:
                path = os.path.join(folder, name)
                if not os.path.islink(path):
                    os.chmod(path, file_mode)
    else:
        os.chmod(root, file_mode)


def _overlap(out: Path, inp: Path) -> Optional[str]:
    if out == inp:
        return "is"
    if out in inp.parents:
        return "contains"
    if inp in out.parents:
        return "is inside"
    return None


def check_out(out: PathLike, force: bool, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Validate ``out`` before any work is done (module docstring); returns it as a :class:`Path`.

    ``inputs``: every file or folder the command reads (``None`` entries are skipped).
    """
    out = Path(out)
    resolved = out.resolve()
    for inp in inputs:
        if inp is None:
            continue
        how = _overlap(resolved, Path(inp).resolve())
        if how:
            raise OutputError(f"--out {out} {how} the input {inp}; choose another --out (the inputs are never "
                              f"modified, --force included)")
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to replace it")
    parent = resolved.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=parent, prefix=".write-check-", delete=True).close()
    except OSError as exc:
        raise OutputError(f"cannot write to {parent}: {exc.strerror or exc}") from None
    return out


@contextmanager
def _signals_held() -> Iterator[None]:
    """SIGINT and SIGTERM are delivered after the block, not inside it."""
    held = {signal.SIGINT, signal.SIGTERM}
    try:
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    except (AttributeError, ValueError, OSError):  # no pthread_sigmask (Windows) or not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def commit(tmp: Path, out: Path) -> None:
    """Replace ``out`` (file or folder, or absent) by the finished ``tmp`` on the same filesystem."""
    _chmod_tree(tmp)
    with _signals_held():
        if out.exists() or out.is_symlink():
            old = out.with_name(f".{out.name}.old")
            _remove(old)
            out.rename(old)
            tmp.rename(out)
            _remove(old)
        else:
            tmp.rename(out)


@contextmanager
def staged_dir(out: PathLike) -> Iterator[Path]:
    """A temporary folder beside ``out``; committed to ``out`` when the block ends normally, removed otherwise."""
    out = Path(out)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def staged_file(out: PathLike) -> Iterator[Path]:
    """A temporary file path beside ``out``; committed to ``out`` when the block ends normally, removed
    otherwise."""
    out = Path(out)
    out.resolve().parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=out.resolve().parent, prefix=f".{out.name}.tmp-")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit(tmp, out)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise


class _RecordingWriter:
    """A binary file that remembers the ``OSError`` of a failed write (torch.save reports it as a bare
    RuntimeError about stream positions)."""

    def __init__(self, fh):
        self.fh, self.error = fh, None

    def write(self, data) -> int:
        try:
            return self.fh.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.fh.flush()


def save_torch(obj, out: PathLike) -> None:
    """``torch.save(obj)`` to ``out`` atomically; a failed write raises an ``OSError`` naming ``out``."""
    import torch

    try:
        with staged_file(out) as tmp, tmp.open("wb") as fh:
            writer = _RecordingWriter(fh)
            try:
                torch.save(obj, writer)
            except RuntimeError:
                if writer.error is not None:
                    raise writer.error from None
                raise
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None


def write_text(out: PathLike, text: str) -> None:
    """Write ``text`` to ``out`` atomically; a failed write raises an ``OSError`` naming ``out``."""
    try:
        with staged_file(out) as tmp:
            tmp.write_text(text)
    except OSError as exc:
        raise OSError(f"cannot write {out}: {exc.strerror or exc}; nothing written") from None


def write_json(out: PathLike, obj) -> None:
    """Write ``obj`` as indented JSON to ``out`` atomically (:func:`write_text`)."""
    import json

    write_text(out, json.dumps(obj, indent=2))
