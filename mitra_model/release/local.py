"""The pull's local folder: DEST, a symlink switched in one step, and its bookkeeping beside it.

DEST is always exactly one complete release (or the previous one):

    DEST -> .DEST.mitra/<version>-<n>        a symlink, replaced atomically (os.replace)
    .DEST.mitra/<version>-<n>/               the release: the selected artifacts + manifest.json
    .DEST.mitra/state.json                   bookkeeping (never inside the folder consumers read,
    .DEST.mitra/lock                         so a folder signature sees exactly the release)
    .DEST.mitra/.staging-*, .link-*          work in progress; removed by the next pull

The state remembers each verified file's (size, mtime_ns, sha256), as huggingface_hub's cache
does: a file whose size and mtime_ns still match is trusted without re-hashing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_validator,
)

from mitra_model.errors import (
    MitraBuildError,
    OutputError,
    PullError,
)
from mitra_model.fileutil import sha256_file
from mitra_model.release import layout
from mitra_model.release.layout import (
    LOCK_FILE,
    MANIFEST_NAME,
    PULL_STATE_NAME,
    PULL_STATE_SCHEMA_ID,
    STATE_FILE,
)
from mitra_model.release.rules import (
    canonical_json,
    sha256_bytes,
)

STAGING_PREFIX = ".staging-"


LINK_PREFIX = ".link-"
# The state file is written to a temporary file and renamed: a pull killed in between leaves this.
STATE_TEMP_PREFIX, STATE_TEMP_SUFFIX = ".state-", ".part"


class FileRecord(BaseModel):
    """A file verified into a release folder: trusted again while its size and mtime_ns match."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    size: StrictInt = Field(ge=0)
    mtime_ns: StrictInt
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class ReleaseRecord(BaseModel):
    """One release folder under `.DEST.mitra/`: which release, and its verified files by name."""

    model_config = ConfigDict(frozen=True, extra="forbid")
    version: str
    manifest_version: StrictInt = Field(ge=1)
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    files: dict[str, FileRecord]


class PullState(BaseModel):
    """`.DEST.mitra/state.json`: the variant DEST is for, and a record per release folder."""

    model_config = ConfigDict(frozen=True, extra="forbid", populate_by_name=True)
    schema_: str = Field(alias="schema", default=PULL_STATE_SCHEMA_ID)
    variant: str
    releases: dict[str, ReleaseRecord]

    @field_validator("schema_")
    @classmethod
    def _known_schema(cls, value: str) -> str:
        if value != PULL_STATE_SCHEMA_ID:
            raise ValueError(f"schema is {value!r}, expected {PULL_STATE_SCHEMA_ID!r}")
        return value

    def dump(self) -> bytes:
        return canonical_json(self.model_dump(by_alias=True))


@dataclass(frozen=True)
class Dest:
    """DEST and its bookkeeping folder."""

    path: Path  # as given: the paths we return are under it
    side: Path  # .<name>.mitra beside it

    @classmethod
    def of(cls, dest: Path) -> Dest:
        dest = Path(dest)
        absolute = Path(os.path.abspath(dest))
        if absolute.name in ("", ".", ".."):
            raise OutputError(f"cannot pull into {dest}: name a folder, e.g. ./mitra")
        side = layout.side_folder_name(absolute.name)
        try:
            limit = os.pathconf(absolute.parent, "PC_NAME_MAX") if absolute.parent.exists() else 255
        except (OSError, ValueError):
            limit = 255
        if len(os.fsencode(side)) > limit:
            raise OutputError(
                f"cannot pull into {dest}: its name is {len(os.fsencode(absolute.name))} bytes long, and pull keeps "
                f"{side[:12]}... beside it, which must fit this filesystem's {limit}-byte limit: use a name of at most "
                f"{limit - len(os.fsencode(side)) + len(os.fsencode(absolute.name))} bytes (nothing was written).")
        return cls(path=dest, side=absolute.with_name(side))

    def link_target(self, folder: str) -> str:
        return f"{self.side.name}/{folder}"  # relative: DEST's parent can move

    def current(self) -> str | None:
        """The release folder DEST points to, or None when DEST does not exist yet.

        Raises:
            OutputError: DEST is something pull did not make (a file, a folder with files, a
                foreign symlink); the message says what to do.
        """
        path = self.path
        if path.is_symlink():
            target = os.readlink(path)
            prefix = f"{self.side.name}/"
            name = target[len(prefix):] if target.startswith(prefix) else ""
            if not name or "/" in name or name.startswith(".") or not (self.side / name).is_dir():
                raise OutputError(
                    f"cannot pull into {path}: it is a symlink to {target!r}, which mitra-build pull "
                    "did not make. Remove it, or pull into another path."
                )
            return name
        if not path.exists():
            if path.parent.exists() and not path.parent.is_dir():
                raise OutputError(
                    f"cannot pull into {path}: {path.parent} is a file, not a folder. Choose a "
                    "destination inside a writable folder (nothing was written)."
                )
            return None
        if path.is_dir():
            entries = sorted(p.name for p in path.iterdir())
            if not entries:
                return None  # an empty folder: replaced by the symlink, nothing is lost
            legacy = " (it was pulled by an older mitra-build)" if PULL_STATE_NAME in entries else ""
            raise OutputError(
                f"cannot pull into {path}: it is a folder with files{legacy}, and a pull replaces "
                "DEST as a whole. Pull into a new path, or delete the folder first (nothing was "
                "written)."
            )
        raise OutputError(
            f"cannot pull into {path}: it is a regular file, not a folder. Choose another --dest "
            "(nothing was written)."
        )


def read_state(dest: Dest) -> PullState | None:
    path = dest.side / STATE_FILE
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise OutputError(f"cannot read {path}: {exc.strerror}. Fix its permissions or delete it.") from None
    try:
        return PullState.model_validate_json(raw)
    except ValidationError as exc:
        raise PullError(
            f"{path} is damaged or from another mitra-build ({exc.error_count()} problems); delete "
            f"{dest.side} (and {dest.path}) to pull afresh"
        ) from None


def write_state(dest: Dest, state: PullState) -> None:
    final = dest.side / STATE_FILE
    fd, tmp = tempfile.mkstemp(prefix=STATE_TEMP_PREFIX, suffix=STATE_TEMP_SUFFIX, dir=dest.side)
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(state.dump())
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def locked(dest: Dest) -> Iterator[None]:
    """One pull at a time into a DEST (an flock, released by the kernel if the process dies)."""
    with open(dest.side / LOCK_FILE, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@dataclass(frozen=True)
class LocalRelease:
    """What DEST holds now: its folder, and the record of it (None when unknown)."""

    folder: str | None
    record: ReleaseRecord | None
    rehash: bool = False  # --verify: a file is trusted only if its bytes hash to its sha256 again

    def trusted(self, dest: Dest, file: str, sha256: str) -> Path | None:
        """The path of `file` in DEST's folder when the state vouches for it (same sha256, same
        size and mtime_ns as when it was verified), else None. No hashing, unless `rehash`."""
        if self.folder is None or self.record is None:
            return None
        known = self.record.files.get(file)
        path = dest.side / self.folder / file
        if known is None or known.sha256 != sha256:
            return None
        try:
            st = path.stat(follow_symlinks=False)
        except OSError:
            return None
        if (st.st_size, st.st_mtime_ns) != (known.size, known.mtime_ns):
            return None
        return path if not self.rehash or sha256_file(path) == sha256 else None


def refuse_foreign_files(dest: Dest, state: PullState | None) -> None:
    """Refuse to manage a bookkeeping folder that holds files pull did not write: a later pull would
    tidy them away.

    Raises:
        OutputError: naming the entries.
    """
    if not dest.side.is_dir():
        return
    known = set(state.releases) if state is not None else set()

    def ours(entry: Path) -> bool:
        return (entry.name in (STATE_FILE, LOCK_FILE) or entry.name in known
                or entry.name.startswith((STAGING_PREFIX, LINK_PREFIX))
                or (entry.name.startswith(STATE_TEMP_PREFIX) and entry.name.endswith(STATE_TEMP_SUFFIX))
                or (entry.is_dir() and not entry.is_symlink() and (entry / MANIFEST_NAME).is_file()))

    foreign = sorted(entry.name for entry in dest.side.iterdir() if not ours(entry))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise OutputError(
            f"cannot pull into {dest.path}: its bookkeeping folder {dest.side} holds files mitra-build did not "
            f"write ({shown}), which a pull would delete. Move them out, or pull into another --dest "
            "(nothing was written).")


def read_local(dest: Dest, variant: str) -> tuple[LocalRelease, PullState | None]:
    folder = dest.current()
    state = read_state(dest) if dest.side.is_dir() else None
    refuse_foreign_files(dest, state)
    if state is not None and state.variant != variant:
        raise PullError(f"{dest.path} already holds variant {state.variant!r}; pull {variant!r} into another folder")
    record = state.releases.get(folder) if (state is not None and folder is not None) else None
    if folder is not None and record is None:  # e.g. the state file was deleted: read the manifest
        record = _record_from_manifest(dest, folder, variant)
    return LocalRelease(folder, record), state


def _record_from_manifest(dest: Dest, folder: str, variant: str) -> ReleaseRecord | None:
    """What release a folder holds when the state has no record of it (no file is trusted)."""
    path = dest.side / folder / MANIFEST_NAME
    try:
        raw = path.read_bytes()
        doc = json.loads(raw)
        if doc.get("variant") != variant:
            raise PullError(f"{dest.path} holds variant {doc.get('variant')!r}; pull {variant!r} into another folder")
        return ReleaseRecord(version=doc["version"], manifest_version=doc["manifest_version"],
                             manifest_sha256=sha256_bytes(raw), files={})
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None  # unreadable: treated as "nothing trusted there"; the pull replaces it


def refuse_older_than_dest(dest: Dest, local: LocalRelease, manifest: dict[str, Any], manifest_sha: str) -> None:
    held = local.record
    if held is None:
        return
    mv = manifest["manifest_version"]
    if held.manifest_version > mv:
        raise PullError(
            f"{dest.path} already holds {manifest['variant']} manifest_version {held.manifest_version} "
            f"(version {held.version!r}); refusing to replace it with the older "
            f"manifest_version {mv} (version {manifest['version']!r}). Pull into an empty folder "
            "to get an older release."
        )
    if held.manifest_version == mv and held.manifest_sha256 != manifest_sha:
        raise PullError(
            f"{dest.path} holds a manifest_version {mv} with manifest sha256 "
            f"{held.manifest_sha256}, but the store's has {manifest_sha}: the store's "
            "history changed. Investigate before pulling into this folder."
        )


def file_record(path: Path, sha256: str) -> FileRecord:
    st = path.stat()
    return FileRecord(size=st.st_size, mtime_ns=st.st_mtime_ns, sha256=sha256)


def next_folder_name(dest: Dest, version: str) -> str:
    taken = {p.name for p in dest.side.iterdir()}
    n = 1
    while f"{version}-{n}" in taken:
        n += 1
    return f"{version}-{n}"


def flip(dest: Dest, folder: str) -> None:
    """Point DEST at `folder` in one rename: a fresh symlink replaces the old one atomically."""
    link = dest.side / f"{LINK_PREFIX}{os.getpid()}-{folder}"
    with contextlib.suppress(FileNotFoundError):
        link.unlink()
    os.symlink(dest.link_target(folder), link)
    try:
        if dest.path.is_dir() and not dest.path.is_symlink():
            dest.path.rmdir()  # an empty folder (checked by current()): nothing is lost
        os.replace(link, dest.path)
    except BaseException:
        with contextlib.suppress(OSError):
            link.unlink()
        raise


def tidy(dest: Dest, *, keep: str | None) -> None:
    """Remove every release folder but `keep`, and work left by killed pulls (caller holds the lock)."""
    for entry in dest.side.iterdir():
        if entry.name in (STATE_FILE, LOCK_FILE) or entry.name == keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                entry.unlink()


def tidy_if_needed(dest: Dest, keep: str | None) -> None:
    """After a no-op pull: clean up what a killed pull left, only if there is something."""
    try:
        extra = [e for e in os.listdir(dest.side) if e not in (STATE_FILE, LOCK_FILE, keep)]
        if extra:
            with locked(dest):
                if dest.current() == keep:
                    tidy(dest, keep=keep)
    except (OSError, MitraBuildError):
        pass  # a read-only DEST still serves its release
