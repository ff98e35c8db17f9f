"""Digests and all-or-nothing writes: a failed step never leaves a half-written file in place."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from mitra_model.errors import OutputError

_CHUNK = 1 << 20
PACKAGE_DIR = Path(__file__).resolve().parent  # the mitra_model package's folder (its code; data/ is package data)


def current_umask() -> int:
    """The process umask. Linux reports it in /proc; elsewhere it can only be read by setting it,
    which is briefly visible to other threads, so that is the fallback."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def normal_permissions(path: Path) -> None:
    """Give `path` the mode a plain open()/mkdir() would have (0644 / 0755 under umask 022).

    mkstemp/mkdtemp create owner-only entries on purpose; once renamed into place they are ordinary
    outputs that a web server or another user may need to read."""
    base = 0o777 if Path(path).is_dir() else 0o666
    os.chmod(path, base & ~current_umask())


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(_CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _cannot_write(final: Path, exc: OSError) -> OutputError:
    reason = exc.strerror or type(exc).__name__
    return OutputError(f"cannot write {final}: {reason}. Choose an output path on a writable filesystem with "
                       "free space (nothing was left there)")


@contextlib.contextmanager
def atomic_file(final: Path) -> Iterator[Path]:
    """Yield a temp path beside `final`; on success it is renamed onto `final`, on error deleted.

    Raises:
        OutputError: `final` is a folder, or its folder cannot be created or written (read-only,
            full disk); the message names the path.
    """
    final = Path(final)
    if final.is_dir():
        raise OutputError(f"cannot write {final}: it is a folder; pass a file path")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent)
    except OSError as exc:
        raise _cannot_write(final, exc) from None
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        normal_permissions(tmp_path)
        os.replace(tmp_path, final)
    except OSError as exc:  # the writer's own I/O (ENOSPC) or the rename
        raise _cannot_write(final, exc) from None
    finally:
        tmp_path.unlink(missing_ok=True)


def refuse_overwriting_inputs(output: Path, *, inputs: Iterable[Path] = (), folders: Iterable[Path] = ()) -> None:
    """Raise OutputError when `output` is one of `inputs` or lies inside one of `folders`.

    An export written over its own snapshot's weights, or a quantization over its fp32 source,
    would destroy what the command reads.
    """
    target = Path(output).resolve()
    for path in inputs:
        if target == Path(path).resolve():
            raise OutputError(f"--output {output} is the input {path}: write the result to another file")
    for folder in folders:
        if target.is_relative_to(Path(folder).resolve()):
            raise OutputError(f"--output {output} is inside the snapshot folder {folder}: write build output "
                              "elsewhere, so the snapshot stays exactly as it was published")


def write_bytes_atomic(final: Path, data: bytes) -> None:
    with atomic_file(final) as tmp:
        tmp.write_bytes(data)


@contextlib.contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield an empty temp folder beside `final`; on success it replaces `final` whole."""
    final = Path(final)
    if final.exists() and not final.is_dir():
        raise OutputError(f"cannot write the folder {final}: a file is in the way")
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    except OSError as exc:
        raise _cannot_write(final, exc) from None
    try:
        yield tmp
        # writers we do not control (safetensors) also create owner-only files
        for entry in (tmp, *tmp.rglob("*")):
            normal_permissions(entry)
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
