"""A loopback HTTP server for the remote-shard tests and ``benchmarks/loader.py``.

``ShardServer(folder)`` serves a folder with Python's ``http.server`` in a thread on 127.0.0.1 (a free
port). Two faults can be switched on:

- ``drop(path, times, fraction, pause_s)``: the next ``times`` GET requests of ``path`` answer 200
  with the full ``Content-Length``, send ``fraction`` of the body, wait ``pause_s`` (so that the
  client reads that part first) and close the connection: a transfer cut mid-file, as a flaky
  object store or proxy does;
- ``latency_s``: every request waits this long before its first byte (a distant store);
- ``stall(path)``: GETs of ``path`` are accepted and never answered (for at most ``STALL_S``);
- ``listings=False``: folders are not listed (404), as on most web servers and CDNs.

``requests`` counts the GET requests per path, ``heads`` the HEAD requests.
"""

from __future__ import annotations

import functools
import os
import socket
import threading
import time
import urllib.parse
from collections import Counter
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

STALL_S = 60.0


class _Handler(SimpleHTTPRequestHandler):
    server: _Server

    def list_directory(self, path):
        if self.server.listings:
            return super().list_directory(path)
        self.send_error(404, "no listings here")
        return None

    def log_message(self, format: str, *args) -> None:  # quiet
        pass

    def _path(self) -> str:
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)

    def do_HEAD(self) -> None:
        with self.server.lock:
            self.server.heads[self._path()] += 1
        time.sleep(self.server.latency_s)
        super().do_HEAD()

    def do_GET(self) -> None:
        path = self._path()
        with self.server.lock:
            self.server.requests[path] += 1
            fraction = pause = None
            stalled = path in self.server.stalled
            if self.server.drops.get(path, (0, 0.0, 0.0))[0] > 0:
                times, fraction, pause = self.server.drops[path]
                self.server.drops[path] = (times - 1, fraction, pause)
        time.sleep(self.server.latency_s)
        if stalled:  # a store that accepted the request and sends nothing
            self.server.stop_stalling.wait(STALL_S)
            self.close_connection = True
            return
        if fraction is None:
            super().do_GET()
            return
        file = Path(self.translate_path(self.path))
        data = file.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", "application/x-tar")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: int(len(data) * fraction)])
        self.wfile.flush()
        time.sleep(pause)
        self.close_connection = True
        try:
            self.connection.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address, handler, latency_s: float, listings: bool):
        super().__init__(address, handler)
        self.listings = listings
        self.stalled: set[str] = set()
        self.stop_stalling = threading.Event()
        self.lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.heads: Counter[str] = Counter()
        self.drops: dict[str, tuple[int, float, float]] = {}
        self.latency_s = latency_s


class ShardServer:
    """``with ShardServer(folder) as srv: srv.url`` -- ``http://127.0.0.1:PORT`` serving ``folder``."""

    def __init__(self, root: str | os.PathLike, *, latency_s: float = 0.0, listings: bool = True) -> None:
        self.root = Path(root)
        handler = functools.partial(_Handler, directory=str(self.root))
        self._server = _Server(("127.0.0.1", 0), handler, latency_s, listings)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def url_of(self, path: str | os.PathLike) -> str:
        """The URL of a file or folder under the served folder."""
        rel = Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        return f"{self.url}/{rel}" if rel != "." else self.url

    @property
    def requests(self) -> Counter[str]:
        return self._server.requests

    @property
    def heads(self) -> Counter[str]:
        return self._server.heads

    def drop(self, path: str | os.PathLike, times: int, fraction: float = 0.5, pause_s: float = 0.0) -> None:
        """Cut the next ``times`` GETs of ``path`` (a served file) after ``fraction`` of its body,
        ``pause_s`` after sending that part."""
        rel = "/" + Path(path).resolve().relative_to(self.root.resolve()).as_posix()
        with self._server.lock:
            self._server.drops[rel] = (times, fraction, pause_s)

    def stall(self, path: str | os.PathLike) -> None:
        """Never answer GETs of ``path`` (a served file)."""
        self._server.stalled.add("/" + Path(path).resolve().relative_to(self.root.resolve()).as_posix())

    def set_latency(self, seconds: float) -> None:
        self._server.latency_s = seconds

    def start(self) -> ShardServer:
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="shard-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.stop_stalling.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> ShardServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":  # a server in a process of its own (benchmarks/loader.py): prints its URL
    import argparse
    import sys

    ap = argparse.ArgumentParser(description="serve a folder on 127.0.0.1 until stdin closes")
    ap.add_argument("folder")
    ap.add_argument("--latency-s", type=float, default=0.0)
    args = ap.parse_args()
    with ShardServer(args.folder, latency_s=args.latency_s) as srv:
        print(srv.url, flush=True)
        sys.stdin.read()
