"""A weights server on 127.0.0.1 for tests: plain URLs (timm's URL weights, torch.hub's download) and the Hugging
Face hub's file API (`HF_ENDPOINT`: HEAD and GET on `/{repo}/resolve/{revision}/{file}` with the commit, ETag and
size headers `hf_hub_download` reads), counting the GETs each file gets. No test reaches the internet."""

from __future__ import annotations

import hashlib
import io
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class Loopback:
    """`serve(path, body)` → the URL it is at; `serve_hub(repo, filename, body)` → the hub's URL of it.
    `gets[path]`: how many times a file was downloaded."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.etags: dict[str, str] = {}  # a file's ETag (the hub: an LFS file's sha256) where not its own
        self.gets: Counter = Counter()
        loopback = self

        class Handler(BaseHTTPRequestHandler):
            def _headers(self) -> bytes | None:
                body = loopback.files.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                etag = loopback.etags.get(self.path) or hashlib.sha256(body).hexdigest()
                self.send_header("ETag", f'"{etag}"')
                self.send_header("X-Repo-Commit", COMMIT)
                self.end_headers()
                return body

            def do_HEAD(self):  # noqa: N802 — http.server's name
                self._headers()

            def do_GET(self):  # noqa: N802
                body = self._headers()
                if body is not None:
                    loopback.gets[self.path] += 1
                    self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Loopback:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve(self, path: str, body: bytes) -> str:
        self.files[path] = body
        return self.url + path

    def serve_hub(self, repo: str, filename: str, body: bytes, etag: str | None = None) -> str:
        path = f"/{repo}/resolve/main/{filename}"
        if etag:
            self.etags[path] = etag
        return self.serve(path, body)


def torch_file(state: dict) -> bytes:
    """`state` as torch.save writes it."""
    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def safetensors_file(state: dict) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in state.items()})
