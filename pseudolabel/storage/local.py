"""Local-filesystem object store (the default backend).

Every write goes to a temp file next to its target and is renamed over it, so a key never shows half
an object. A writer killed between the two (kill -9, OOM, power loss) leaves its temp file behind;
the name says whose it was: ``.<target>.pseudolabel-tmp-<host>-<pid>-<random>``. :meth:`list` never
shows temp files, and :meth:`LocalObjectStore.remove_stale_temp` deletes those whose writer is gone:
on this host, the pid no longer runs (a zombie counts as gone); written by another host (a shared
volume) or by a version before this naming (``.tmp-*``), the file is older than
:data:`FOREIGN_TEMP_MAX_AGE_S`. A live writer's temp file is never removed.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pseudolabel.storage.base import ObjectInfo, ObjectNotFound, ObjectStore, clean_key, clean_prefix

TEMP_MARKER = ".pseudolabel-tmp-"
_LEGACY_TEMP_PREFIX = ".tmp-"  # what put_bytes named its temp files before the marker existed
# No single write takes an hour: a temp file this old whose writer cannot be checked here is litter.
FOREIGN_TEMP_MAX_AGE_S = 3600.0
_TARGET_NAME_LIMIT = 100  # keeps temp names under the filesystem's 255-byte limit
_HOST = socket.gethostname()


@dataclass(frozen=True)
class _TempName:
    target: str  # the name (maybe shortened) of the file it was going to become; "" if unknown
    host: str | None
    pid: int | None


def _temp_prefix(target_name: str) -> str:
    return f".{target_name[:_TARGET_NAME_LIMIT]}{TEMP_MARKER}{_HOST}-{os.getpid()}-"


def _parse_temp(name: str) -> _TempName | None:
    """The writer of temp file ``name``, or None if ``name`` is not a temp file."""
    if name.startswith(_LEGACY_TEMP_PREFIX):
        return _TempName(target="", host=None, pid=None)
    if not name.startswith(".") or TEMP_MARKER not in name:
        return None
    target, _, writer = name[1:].rpartition(TEMP_MARKER)
    host, pid, _random = (writer.rsplit("-", 2) + ["", ""])[:3]
    if not pid.isdigit():
        return _TempName(target=target, host=None, pid=None)
    return _TempName(target=target, host=host, pid=int(pid))


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # runs, as another user
    except OverflowError:
        return False
    try:  # a killed process nobody reaped yet (a zombie) still answers kill(0) but writes nothing
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True
    return state not in ("Z", "X")


def _is_stale(temp: _TempName, path: Path) -> bool:
    if temp.host == _HOST and temp.pid is not None:
        return not _process_alive(temp.pid)
    try:
        return time.time() - path.stat().st_mtime > FOREIGN_TEMP_MAX_AGE_S
    except FileNotFoundError:
        return False  # renamed or removed meanwhile


class LocalObjectStore(ObjectStore):
    def __init__(self, root: str | os.PathLike[str]):
        self.root = Path(root).expanduser().resolve()

    def _path(self, key: str) -> Path:
        return self.root / clean_key(key)

    def put_bytes(self, key: str, data: bytes) -> None:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        # Next to the target, so os.replace stays a same-filesystem rename.
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key: str, path: str | os.PathLike[str]) -> None:
        """Copy the file at ``path`` (streamed) to a temp file next to the target, then rename it over."""
        target = self._path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(target.name), dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle, open(path, "rb") as source:
                shutil.copyfileobj(source, handle, 1 << 20)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def get_bytes(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
            raise ObjectNotFound(self.uri(key)) from exc

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list(self, prefix: str = "") -> Iterator[ObjectInfo]:
        prefix = clean_prefix(prefix)
        # Walk from the deepest directory the prefix names, then filter by the full prefix.
        base = self.root / prefix.rsplit("/", 1)[0] if "/" in prefix else self.root
        if not base.is_dir():
            return
        found = []
        for dirpath, _dirnames, filenames in os.walk(base):
            for name in filenames:
                if _parse_temp(name) is not None:
                    continue
                full = Path(dirpath) / name
                key = full.relative_to(self.root).as_posix()
                if key.startswith(prefix):
                    found.append(ObjectInfo(key=key, size=full.stat().st_size))
        yield from sorted(found, key=lambda info: info.key)

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def delete_prefix(self, prefix: str) -> int:
        deleted = super().delete_prefix(prefix)
        cleaned = clean_prefix(prefix)
        if cleaned.endswith("/"):  # a folder: drop the directories it leaves empty
            for dirpath, _dirnames, _filenames in os.walk(self.root / cleaned, topdown=False):
                with contextlib.suppress(OSError):  # not empty (a new object, a live temp file)
                    os.rmdir(dirpath)
        return deleted

    def remove_stale_temp(self, prefix: str) -> int:
        """Delete temp files of dead writers whose target key starts with ``prefix`` (see the module doc)."""
        removed = 0
        for path, temp in self._temp_files(clean_prefix(prefix)):
            if _is_stale(temp, path):
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def _temp_files(self, prefix: str) -> Iterator[tuple[Path, _TempName]]:
        directory, _, stem = prefix.rpartition("/")
        base = self.root / directory if directory else self.root
        if not base.is_dir():
            return
        for entry in os.scandir(base):
            if entry.is_dir(follow_symlinks=False):
                if entry.name.startswith(stem):  # everything below is under the prefix
                    for dirpath, _dirnames, filenames in os.walk(entry.path):
                        for name in filenames:
                            if (temp := _parse_temp(name)) is not None:
                                yield Path(dirpath) / name, temp
            elif (temp := _parse_temp(entry.name)) is not None and temp.target.startswith(stem):
                # (A legacy temp file's target is unknown: it only matches a prefix naming its folder.)
                yield Path(entry.path), temp

    def uri(self, key: str = "") -> str:
        return str(self._path(key)) if key else str(self.root)
