"""A 127.0.0.1 HTTP server for the browser check: the page, its scripts, onnxruntime-web, the model.

It serves exactly the files and folders it is given (nothing above or beside them), on a free port,
with the Content-Type WebAssembly needs, and stops when the `serving` block ends.
"""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

_CONTENT_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".mjs": "text/javascript; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".wasm": "application/wasm",  # required for WebAssembly.instantiateStreaming
    ".json": "application/json",
    ".map": "application/json",
}


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of what `server.resolve` maps the URL path to; 404 for the rest."""

    server: StaticServer

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._serve(body=True)

    def do_HEAD(self) -> None:  # noqa: N802
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.server.resolve(self.path.split("?", 1)[0])
        if path is None:
            self.send_error(404, "not served")
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Type", _CONTENT_TYPES.get(path.suffix, "application/octet-stream"))
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


class StaticServer(http.server.ThreadingHTTPServer):
    """Serves fixed files and the plain files directly inside fixed folders; nothing else."""

    daemon_threads = True

    def __init__(self, files: dict[str, Path], folders: dict[str, Path]) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files = files  # URL path -> local file
        self.folders = folders  # URL prefix ending in "/" -> local folder

    def resolve(self, url_path: str) -> Path | None:
        """The local file for `url_path`, or None: not served (no subfolders, dot files or `..`)."""
        if url_path in self.files:
            return self.files[url_path]
        for prefix, folder in self.folders.items():
            if url_path.startswith(prefix):
                name = url_path[len(prefix):]
                if name and "/" not in name and "\\" not in name and ".." not in name and not name.startswith("."):
                    candidate = folder / name
                    return candidate if candidate.is_file() else None
        return None

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"


@contextlib.contextmanager
def serving(files: dict[str, Path], folders: dict[str, Path]) -> Iterator[StaticServer]:
    """Serve `files` (URL path -> file) and `folders` (URL prefix ending in "/" -> folder) on a free port.

    Args:
        files: single files, e.g. {"/model.onnx": path}.
        folders: folders whose plain files are served, e.g. {"/lib/": path}.

    Returns:
        A context manager yielding the running server (its `url` is http://127.0.0.1:PORT); the
        server is shut down and its port closed when the block ends.
    """
    server = StaticServer(files, folders)
    thread = threading.Thread(target=server.serve_forever, name="mitra-consumer-http", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)
