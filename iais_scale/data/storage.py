"""Where bytes live: local paths, URLs opened through fsspec, and ``pipe:`` commands.

Every reader and writer of shards, ``sizes.json``, manifests and synced checkpoints opens through
this module, so a URL works wherever a path does. Opening is the libraries' job: fsspec for
``http(s)://``, ``s3://``, ``gs://``, ``az://``, ``hf://`` ...; ``webdataset.gopen`` for ``pipe:CMD``.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import posixpath
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

# fsspec scheme -> the package that implements it (named in the error when it is missing).
_SCHEME_PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs",
    "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp", "hf": "huggingface_hub",
}
_EXTRAS = {"s3fs": "s3", "gcsfs": "gcs", "adlfs": "azure", "aiohttp": "remote", "huggingface_hub": "remote"}


def scheme(url: str) -> str:
    """``file`` for local paths (and ``file://``), ``pipe`` for ``pipe:CMD``, else the URL scheme."""
    url = str(url)
    if url.startswith("pipe:"):
        return "pipe"
    head, sep, _ = url.partition("://")
    return head.lower() if sep and head.isidentifier() else "file"


def is_local(url: str | os.PathLike) -> bool:
    return scheme(str(url)) == "file"


def local_path(url: str | os.PathLike) -> Path:
    """The filesystem path of a local URL (``file://`` stripped)."""
    url = str(url)
    return Path(url[len("file://"):] if url.startswith("file://") else url)


def join(base: str | os.PathLike, *names: str) -> str:
    """``base/name`` for a folder path or URL (URLs keep their ``//``; pathlib would collapse them)."""
    base = str(base)
    if is_local(base):
        return str(local_path(base).joinpath(*names))
    return posixpath.join(base.rstrip("/"), *names)


def parent(url: str) -> str:
    """The folder holding ``url``."""
    return str(local_path(url).parent) if is_local(url) else url.rstrip("/").rsplit("/", 1)[0]


def basename(url: str) -> str:
    return url.rstrip("/").rsplit("/", 1)[-1]


def expand(spec: str) -> list[str]:
    """A shard list spec -> URLs: ``::`` joins several specs (OpenCLIP), each brace-expanded."""
    from braceexpand import braceexpand

    out: list[str] = []
    for part in str(spec).split("::"):
        if part.strip():
            out += list(braceexpand(part.strip()))
    return out


def missing_handler(url: str) -> str | None:
    """Why ``url`` cannot be opened here (a missing package, an unknown scheme), or None."""
    s = scheme(url)
    if s in ("file", "pipe"):
        return None
    from fsspec.registry import known_implementations, registry

    if s not in known_implementations and s not in registry:
        return f"{url}: no handler for the URL scheme {s!r} (fsspec knows none)"
    package = _SCHEME_PACKAGES.get(s)
    if package is not None and importlib.util.find_spec(package) is None:
        extra = _EXTRAS.get(package)
        hint = f"pip install 'iais_scale[{extra}]'" if extra else f"pip install {package}"
        return f"{url}: the {s}:// scheme needs the package {package!r} ({hint})"
    return None


def open_read(url: str) -> IO[bytes]:
    """A binary stream of ``url``: a seekable file for local paths and object stores, a
    forward-only stream for HTTP and pipes (their ``seekable()`` is False)."""
    s = scheme(url)
    if s == "file":
        return open(local_path(url), "rb")
    if s == "pipe":
        from webdataset.gopen import gopen

        return _ForwardOnly(gopen(url, "rb"))
    import fsspec

    if s in ("http", "https"):
        # block_size=0: one streamed GET, no range requests (plain HTTP servers do not support them).
        return _ForwardOnly(fsspec.open(url, "rb", block_size=0).open())
    return fsspec.open(url, "rb").open()


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def exists(url: str) -> bool:
    if is_local(url):
        return local_path(url).exists()
    if scheme(url) == "pipe":
        return True
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        return fs.exists(path)
    except (OSError, ValueError):
        return False


def listdir(url: str) -> list[str] | None:
    """Entries (full URLs) of a folder, or None where the store cannot list (HTTP, pipes)."""
    if is_local(url):
        p = local_path(url)
        return sorted(str(c) for c in p.iterdir()) if p.is_dir() else None
    if scheme(url) in ("pipe", "http", "https"):
        return None
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    try:
        entries = fs.ls(path, detail=False)
    except (OSError, ValueError):
        return None
    prefix = scheme(url) + "://"
    return sorted(e if "://" in e else prefix + e.lstrip("/") for e in entries)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write a whole file: locally through a temporary name and a rename, remotely in one PUT
    (object stores make an object visible only once it is complete)."""
    if is_local(url):
        path = local_path(url)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    import fsspec

    with fsspec.open(url, "wb") as f:
        f.write(data)


def copy_tree(src: str, dst: str, *, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Copy the files of folder ``src`` (recursively) to ``dst`` (any URL); returns the names copied.
    Names for which ``skip`` is true are left out (the caller copies them last, e.g. a marker)."""
    import fsspec

    src_fs, src_path = fsspec.core.url_to_fs(src)
    dst_fs, dst_path = fsspec.core.url_to_fs(dst)
    names = []
    for full in sorted(src_fs.find(src_path)):
        name = posixpath.relpath(full, src_path) if not is_local(src) else os.path.relpath(full, src_path)
        if skip(name):
            continue
        target = posixpath.join(dst_path, name.replace(os.sep, "/"))
        with src_fs.open(full, "rb") as fin, dst_fs.open(target, "wb") as fout:
            while chunk := fin.read(1 << 24):
                fout.write(chunk)
        names.append(name)
    return names


def retry(fn: Callable[[], T], *, attempts: int, backoff_s: float, what: str) -> T:
    """``fn()``, retried after transient failures with exponential back-off (jittered)."""
    for attempt in range(attempts + 1):
        try:
            return fn()
        except Exception as e:  # transports raise many types (OSError, aiohttp and botocore errors)
            if attempt == attempts:
                raise
            delay = backoff_s * 2**attempt * (0.5 + random.random())
            log.warning("%s failed (%s: %s); retry %d of %d in %.1f s", what, type(e).__name__, e,
                        attempt + 1, attempts, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


class _ForwardOnly(io.RawIOBase):
    """A stream that says it cannot seek, so readers skip by reading (HTTP bodies, pipes)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        return self.inner.read(n)

    def readinto(self, b) -> int:
        data = self.inner.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                super().close()


class _Prefilled(io.RawIOBase):
    """``head`` (bytes already read ahead) followed by the rest of ``inner``."""

    def __init__(self, head: bytes, inner: IO[bytes]) -> None:
        self.head, self.inner, self.pos = head, inner, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def read(self, n: int = -1) -> bytes:
        if self.pos < len(self.head):
            take = len(self.head) - self.pos if n < 0 else min(n, len(self.head) - self.pos)
            out = self.head[self.pos : self.pos + take]
            self.pos += take
            if n < 0:
                return out + self.inner.read()
            if take == n:
                return out
            return out + self.inner.read(n - take)
        return self.inner.read(n)

    def readinto(self, b) -> int:
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                super().close()


class Prefetcher:
    """Opens the next remote shard, and reads its first bytes, while the current one is consumed.

    ``get(url)`` returns the stream opened ahead by ``ahead(url)`` (or opens it now). Local files
    are not prefetched: the page cache does that.
    """

    def __init__(self, head_bytes: int = 4 << 20) -> None:
        self.head_bytes = head_bytes
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}

    def _open(self, url: str) -> IO[bytes]:
        f = open_read(url)
        try:
            head = f.read(self.head_bytes)
        except BaseException:
            f.close()
            raise
        return _Prefilled(head, f)

    def ahead(self, url: str) -> None:
        if is_local(url) or url in self._pending:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="shard-prefetch")
        self._pending[url] = self._pool.submit(self._open, url)

    def get(self, url: str) -> IO[bytes]:
        future = self._pending.pop(url, None)
        if future is None:
            return open_read(url)
        return future.result()  # a failure to open surfaces here, where the caller retries

    def close(self) -> None:
        for future in self._pending.values():
            future.add_done_callback(lambda f: f.exception() is None and f.result().close())
        self._pending.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None


def iter_chunks(f: IO[bytes], size: int = 1 << 20) -> Iterator[bytes]:
    while chunk := f.read(size):
        yield chunk
