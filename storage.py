"""File storage for uploads and task outputs. Local directory by default.

Keys are opaque relative paths chosen by the caller (`uploads/<user>/<id>`,
`outputs/<task>/<name>`); the API serves a file only after checking its owner in the DB.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import BinaryIO, Protocol


class Storage(Protocol):
    def save(self, key: str, data: bytes | BinaryIO) -> int: ...
    def save_file(self, key: str, path: Path) -> int: ...
    def open(self, key: str) -> BinaryIO: ...
    def path(self, key: str) -> Path: ...
    def size(self, key: str) -> int: ...
    def exists(self, key: str) -> bool: ...
    def delete(self, key: str) -> None: ...


class LocalStorage:
    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        target = (self.root / key).resolve()
        if self.root not in target.parents:
            raise ValueError(f"storage key escapes the root: {key!r}")
        return target

    def _atomic_target(self, key: str):
        target = self.path(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".part-")
        return target, fd, Path(tmp)

    def save(self, key: str, data: bytes | BinaryIO) -> int:
        # Write to a temporary file and rename, so a reader never sees half a file.
        target, fd, tmp = self._atomic_target(key)
        with os.fdopen(fd, "wb") as out:
            if isinstance(data, (bytes, bytearray)):
                out.write(data)
            else:
                shutil.copyfileobj(data, out, 1 << 20)
        os.replace(tmp, target)
        return target.stat().st_size

    def save_file(self, key: str, path: Path) -> int:
        target, fd, tmp = self._atomic_target(key)
        os.close(fd)
        shutil.copyfile(path, tmp)
        os.replace(tmp, target)
        return target.stat().st_size

    def open(self, key: str) -> BinaryIO:
        return open(self.path(key), "rb")

    def size(self, key: str) -> int:
        return self.path(key).stat().st_size

    def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)
