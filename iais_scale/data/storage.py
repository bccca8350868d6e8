"""Where bytes live: local paths, URLs opened through fsspec, and ``pipe:`` commands.

Every reader and writer of shards, ``sizes.json``, manifests and synced checkpoints opens through
this module, so a URL works wherever a path does. Opening is the libraries' job: fsspec for
``http(s)://``, ``s3://``, ``gs://``, ``az://``, ``hf://`` ...; ``webdataset.gopen`` for ``pipe:CMD``.
What is supported, and how (endpoints, retries, prefetch): ``docs/data-format.md``, "Where shards
can live".
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
# S3-compatible stores (MinIO, Ceph, R2, moto ...): the endpoint botocore's own variables name.
S3_ENDPOINT_ENV = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
_HTTP_BUFFER = 1 << 20  # bytes read from an HTTP body per call into its event loop


class MissingHandler(ValueError):
    """A URL whose scheme has no handler here (an fsspec implementation or its package missing)."""

TIMEOUT_S = 60.0  # a remote read that receives nothing this long fails (data.io_timeout_s)

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


def _check_handler(url: str) -> None:
    problem = missing_handler(url)
    if problem:
        raise MissingHandler(problem)


def fs_options(url: str, timeout_s: float = TIMEOUT_S) -> dict:
    """Options for the fsspec filesystem of ``url``. HTTP(S) and S3: a connection that sends nothing
    for ``timeout_s`` fails (aiohttp waits 300 s, per attempt, by default), so a stalled store
    becomes a retry and then a counted ``bad_shard``, not a silent 20-minute wait. S3: the endpoint
    named by ``AWS_ENDPOINT_URL_S3`` or ``AWS_ENDPOINT_URL`` (botocore's own variables, passed
    explicitly so that every botocore version and every fsspec call honours them), unless fsspec's
    configuration (``FSSPEC_S3_ENDPOINT_URL``, ``FSSPEC_S3``) already names one."""
    s = scheme(url)
    if s in ("http", "https"):
        import aiohttp

        return {"client_kwargs": {"timeout": aiohttp.ClientTimeout(total=None, sock_connect=timeout_s,
                                                                   sock_read=timeout_s)}}
    if s not in ("s3", "s3a"):
        return {}
    options: dict = {"config_kwargs": {"connect_timeout": timeout_s, "read_timeout": timeout_s}}
    if os.environ.get("AWS_IGNORE_CONFIGURED_ENDPOINT_URLS", "").lower() == "true":
        return options
    import fsspec.config

    conf = fsspec.config.conf.get("s3", {})
    if conf.get("endpoint_url") or (conf.get("client_kwargs") or {}).get("endpoint_url"):
        return options
    endpoint = next((os.environ[v] for v in S3_ENDPOINT_ENV if os.environ.get(v)), None)
    return {**options, "endpoint_url": endpoint} if endpoint else options


def filesystem(url: str, timeout_s: float = TIMEOUT_S):
    """(fsspec filesystem, path within it) of a URL; MissingHandler when its scheme cannot be opened."""
    _check_handler(url)
    import fsspec

    return fsspec.core.url_to_fs(url, **fs_options(url, timeout_s))


def open_read(url: str, timeout_s: float = TIMEOUT_S) -> IO[bytes]:
    """A binary stream of ``url``: a seekable file for local paths and object stores, a
    forward-only stream for HTTP and pipes (their ``seekable()`` is False). A remote store that
    sends nothing for ``timeout_s`` fails the read (``fs_options``).

    Raises MissingHandler (a ValueError) when the URL's scheme has no handler installed."""
    s = scheme(url)
    if s == "file":
        return open(local_path(url), "rb")
    if s == "pipe":
        from webdataset.gopen import gopen

        return _PipeStream(gopen(url, "rb"))
    fs, path = filesystem(url, timeout_s)
    if s in ("http", "https"):
        # Buffered: each read of the body is a round trip into fsspec's event loop thread.
        return io.BufferedReader(_ForwardOnly(_http_stream(fs, path)), _HTTP_BUFFER)
    return fs.open(path, "rb")


def _http_stream(fs, url: str):
    """One streamed GET of ``url``: no range requests (plain HTTP servers do not support them) and
    no HEAD request first (``fs.open(block_size=0)`` asks for the size it does not need: one more
    round trip per shard). A missing file still raises FileNotFoundError, from the GET."""
    try:
        from fsspec.asyn import sync
        from fsspec.implementations.http import HTTPStreamFile

        session = sync(fs.loop, fs.set_session)
    except (ImportError, AttributeError):  # another fsspec: its own streamed open
        return fs.open(url, "rb", block_size=0)
    return HTTPStreamFile(fs, url, mode="rb", loop=fs.loop, session=session, **fs.kwargs)


def read_bytes(url: str) -> bytes:
    with open_read(url) as f:
        return f.read()


def exists(url: str) -> bool:
    if is_local(url):
        return local_path(url).exists()
    if scheme(url) == "pipe":
        return True
    fs, path = filesystem(url)
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
    fs, path = filesystem(url)
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
    fs, path = filesystem(url)
    with fs.open(path, "wb") as f:
        f.write(data)


def copy_tree(src: str, dst: str, *, skip: Callable[[str], bool] = lambda name: False) -> list[str]:
    """Copy the files of folder ``src`` (recursively) to ``dst`` (any URL); returns the names copied.
    Names for which ``skip`` is true are left out (the caller copies them last, e.g. a marker)."""
    src_fs, src_path = filesystem(src)
    dst_fs, dst_path = filesystem(dst)
    names = []
    for full in sorted(src_fs.find(src_path)):
        name = posixpath.relpath(full, src_path) if not is_local(src) else os.path.relpath(full, src_path)
        if skip(name):
            continue
        target = posixpath.join(dst_path, name.replace(os.sep, "/"))
        if is_local(dst):  # object stores have no folders; a local copy needs them made
            os.makedirs(posixpath.dirname(target), exist_ok=True)
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
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def close(self) -> None:
        if not self.closed:
            try:
                self.inner.close()
            finally:
                super().close()


class _PipeStream(_ForwardOnly):
    """The output of a ``pipe:`` command (webdataset's ``Pipe``). A command that fails while it is
    read is an error (``Pipe.read`` checks its status after every read; ``close`` after the last
    byte). Closed before its end (a reader that has what it wanted), the command is stopped and its
    exit status ignored: it would die of SIGPIPE, or fail writing (``curl`` exits 23), which says
    nothing about the data."""

    def __init__(self, inner) -> None:
        super().__init__(inner)
        self.at_end = False

    def read(self, n: int = -1) -> bytes:
        data = self.inner.read(n)
        if not data and n != 0:
            self.at_end = True
        return data

    def close(self) -> None:
        if not self.closed and not self.at_end:
            self.inner.ignore_errors = True
            proc = getattr(self.inner, "proc", None)
            if proc is not None and proc.poll() is None:
                proc.kill()
        super().close()


class _Prefilled(_ForwardOnly):
    """``head`` (bytes already read ahead) followed by the rest of ``inner``."""

    def __init__(self, head: bytes, inner: IO[bytes]) -> None:
        super().__init__(inner)
        self.head, self.pos = head, 0

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


class Prefetcher:
    """Opens the next remote shard, and reads its first bytes, while the current one is consumed.

    ``get(url)`` returns the stream opened ahead by ``ahead(url)`` (or opens it now). Local files
    are not prefetched: the page cache does that.
    """

    def __init__(self, head_bytes: int = 4 << 20, timeout_s: float = TIMEOUT_S) -> None:
        self.head_bytes, self.timeout_s = head_bytes, timeout_s
        self._pool: ThreadPoolExecutor | None = None
        self._pending: dict[str, Future] = {}

    def _open(self, url: str) -> IO[bytes]:
        f = open_read(url, self.timeout_s)
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
            return open_read(url, self.timeout_s)
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
