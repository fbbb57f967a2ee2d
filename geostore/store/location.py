"""Where a store lives: a local folder or any URL fsspec reaches (`s3://`, `memory://`, `file://`, ...).

The writer, the reader and the derived caches touch storage only through this small interface and
through the zarr store it opens, so the commit protocol is the same everywhere. A file that must
change atomically (the root `zarr.json`, the commit record) is written under a temporary name and
renamed on a local disk; an object store replaces an object whole with one PUT, so readers see the
old or the new bytes, never a mix. Remote credentials and endpoints come from the usual environment
and fsspec configuration (`AWS_*` variables, `FSSPEC_S3_ENDPOINT_URL`, ...) or `storage_options`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import zarr

from geostore.errors import StoreError

# Suffix of files being written before their atomic rename (zarr's LocalStore uses it too): a killed
# writer can leave them behind; the next writer removes them.
PARTIAL_SUFFIX = ".partial"

# The writer lock (see lock.py): not part of the store's data; a folder holding only it is empty.
LOCK_KEY = ".geostore-lock"


class Location:
    """A folder-like place holding one store (or a sweep), with the file operations stores need.

    Keys are `/`-separated paths relative to the location. Build one with `Location.of(target)`.
    """

    def __init__(self, url: str, *, local: Path | None = None, fs: object = None, root: str = "",
                 storage_options: dict | None = None) -> None:
        self.url = url
        self.local = local
        self._fs = fs
        self._root = root.rstrip("/")
        self.storage_options = dict(storage_options or {})

    @classmethod
    def of(cls, target: str | os.PathLike | Location, storage_options: dict | None = None) -> Location:
        """A location from a local path, a `file://` URL or any fsspec URL; StoreError for an unusable URL."""
        if isinstance(target, Location):
            return target
        text = os.fspath(target)
        if "://" not in text or text.startswith("file://"):
            path = Path(text.removeprefix("file://"))
            return cls(str(path), local=path)
        import fsspec.core

        try:
            fs, root = fsspec.core.url_to_fs(text, **(storage_options or {}))
        except ImportError as exc:
            raise StoreError(f"{text}: this URL needs a package that is not installed ({exc})") from None
        except (ValueError, TypeError) as exc:
            raise StoreError(f"{text}: not a usable store URL ({exc})") from None
        return cls(text.rstrip("/"), fs=fs, root=root, storage_options=storage_options)

    # --------------------------------------------------------------------------------- naming
    @property
    def is_local(self) -> bool:
        """True for a folder on this machine's file system."""
        return self.local is not None

    @property
    def name(self) -> str:
        """The last path segment (a store folder's name)."""
        return self.local.name if self.local is not None else self.url.rstrip("/").rsplit("/", 1)[-1]

    def child(self, key: str) -> Location:
        """The location `key` below this one."""
        if self.local is not None:
            return Location(str(self.local / key), local=self.local / key)
        return Location(f"{self.url}/{key}", fs=self._fs, root=self._full(key),
                        storage_options=self.storage_options)

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def _full(self, key: str) -> str:
        return f"{self._root}/{key}" if key else self._root

    def _path(self, key: str) -> Path:
        return self.local / key if key else self.local

    # ---------------------------------------------------------------------------------- queries
    def exists(self, key: str = "") -> bool:
        """Whether a file or folder `key` (the location itself by default) exists."""
        if self.local is not None:
            return self._path(key).exists()
        self._fs.invalidate_cache(self._full(key))
        return bool(self._fs.exists(self._full(key)))

    def is_file(self, key: str = "") -> bool:
        """Whether `key` is a file (not a folder)."""
        if self.local is not None:
            return self._path(key).is_file()
        self._fs.invalidate_cache(self._full(key))
        return bool(self._fs.isfile(self._full(key)))

    def is_empty(self) -> bool:
        """True when nothing exists here yet (a missing folder or an empty one)."""
        if self.local is not None:
            return not self.local.exists() or not any(p.name != LOCK_KEY for p in self.local.iterdir())
        return not [key for key in self.files() if key != LOCK_KEY]

    def files(self, key: str = "") -> list[str]:
        """Keys of every file below `key`, relative to this location."""
        if self.local is not None:
            base = self._path(key)
            return [str(f.relative_to(self.local)) for f in base.rglob("*") if f.is_file()] if base.is_dir() else []
        self._fs.invalidate_cache()
        prefix = self._root + "/"
        return [f.removeprefix(prefix) for f in self._fs.find(self._full(key))]

    def file_sizes(self, key: str = "") -> dict[str, int]:
        """Every file below `key` with its size in bytes (one listing)."""
        if self.local is not None:
            base = self._path(key)
            if not base.is_dir():
                return {}
            out = {}
            for f in base.rglob("*"):
                with contextlib.suppress(FileNotFoundError):
                    if f.is_file():
                        out[str(f.relative_to(self.local))] = f.stat().st_size
            return out
        self._fs.invalidate_cache()
        prefix = self._root + "/"
        found = self._fs.find(self._full(key), detail=True)
        return {name.removeprefix(prefix): int(info.get("size") or 0) for name, info in found.items()}

    def children(self, key: str = "") -> list[str]:
        """Names of the folders (prefixes) directly below `key`, sorted."""
        if self.local is not None:
            base = self._path(key)
            return sorted(p.name for p in base.iterdir() if p.is_dir()) if base.is_dir() else []
        full = self._full(key)
        self._fs.invalidate_cache(full)
        if not self._fs.exists(full):
            return []
        return sorted(entry["name"].rstrip("/").rsplit("/", 1)[-1] for entry in self._fs.ls(full, detail=True)
                      if entry["type"] == "directory")

    def nbytes(self) -> int:
        """Bytes of every file here."""
        if self.local is not None:
            return sum(f.stat().st_size for f in self.local.rglob("*") if f.is_file())
        return int(self._fs.du(self._root)) if self.files() else 0

    def writable(self) -> bool:
        """Whether this process may write here (always assumed for remote locations: a write error tells)."""
        return os.access(self.local, os.W_OK) if self.local is not None else True

    # ------------------------------------------------------------------------------- reading
    def read_bytes(self, key: str) -> bytes:
        """The bytes of file `key`; FileNotFoundError when it is missing."""
        if self.local is not None:
            return self._path(key).read_bytes()
        self._fs.invalidate_cache(self._full(key))  # a cached listing without the file would say it is missing
        return self._fs.cat_file(self._full(key))

    def read_text(self, key: str) -> str:
        """The text of file `key` (UTF-8)."""
        return self.read_bytes(key).decode()

    # ------------------------------------------------------------------------------- writing
    def write_bytes(self, key: str, data: bytes) -> None:
        """Write file `key` (folders created as needed)."""
        if self.local is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
        else:
            self._fs.pipe_file(self._full(key), data)

    def write_atomic(self, key: str, data: bytes) -> None:
        """Replace file `key` so that readers see the old bytes or the new ones, never a mix."""
        if self.local is None:
            self.write_bytes(key, data)  # one PUT replaces an object whole
            return
        path = self._path(key)
        tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
        self.write_bytes(str(tmp.relative_to(self.local)), data)
        os.replace(tmp, path)

    def create_exclusive(self, key: str, data: bytes) -> bool:
        """Create file `key` holding `data` unless it exists (atomically); False when it already existed."""
        if self.local is not None:
            path = self._path(key)
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                with open(path, "xb") as f:
                    f.write(data)
            except FileExistsError:
                return False
            return True
        try:
            self._fs.pipe_file(self._full(key), data, mode="create")
        except FileExistsError:
            return False
        except TypeError:
            raise StoreError(f"{self}: this storage cannot create objects exclusively, so two writers could not "
                             "be kept apart: write the store on S3 or a local folder") from None
        return True

    def remove(self, key: str) -> None:
        """Remove file or folder `key` and everything below it; nothing happens when it is missing."""
        if self.local is not None:
            path = self._path(key)
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            return
        full = self._full(key)
        self._fs.invalidate_cache(full)
        if self._fs.exists(full):
            self._fs.rm(full, recursive=True)

    def move(self, key: str, to: str) -> None:
        """Move file or folder `key` to `to` (replacing nothing: `to` must be missing). A rename on local folders;
        on object stores a copy of each object, then its removal."""
        if self.local is not None:
            target = self._path(to)
            target.parent.mkdir(parents=True, exist_ok=True)
            os.rename(self._path(key), target)
            return
        sources = self.files(key)
        self._fs.copy([self._full(k) for k in sources], [self._full(to + k[len(key):]) for k in sources])
        self.remove(key)

    def make_folder(self) -> None:
        """Create the location's folder where folders exist (a no-op on object stores)."""
        if self.local is not None:
            self.local.mkdir(parents=True, exist_ok=True)

    # ---------------------------------------------------------------------------------- zarr
    def zarr_store(self, *, read_only: bool) -> zarr.abc.store.Store:
        """A zarr store rooted here: zarr's LocalStore for folders, its FsspecStore for URLs."""
        if self.local is not None:
            return zarr.storage.LocalStore(self.local, read_only=read_only)
        return zarr.storage.FsspecStore.from_url(self.url, storage_options=self.storage_options or None,
                                                 read_only=read_only)
