"""Real registries for the pull/push tests: Debian's ``docker-registry`` (distribution 2.8) on
127.0.0.1, with TLS from a CA the test makes with openssl, and htpasswd (bcrypt) or token auth.

- `make_pki` makes a CA and a server certificate for 127.0.0.1 (``ca.crt`` alone goes in the
  ``--cert-dir`` the clients get), and a self-signed key pair for signing tokens.
- `RegistryProcess` runs ``docker-registry serve`` with a generated config and a log file (its
  access lines are how the tests count blob GETs); `stop`/`start` keep the storage, so a test can
  stop the registry mid-pull and start it again on the same port.
- `TokenServer` is the small token service the token spec describes: Basic credentials (or none, for
  anonymous pull tokens) in, a JWT signed RS256 (by ``openssl dgst``) with an ``x5c`` header out,
  carrying the scopes asked for; it counts what it was asked.
- `FaultProxy` is a plain-HTTP proxy in front of a registry that can answer 500 a number of times,
  corrupt a blob, cut a blob short or stop the registry while a blob is half sent, and redirect blob
  GETs to another host name (recording whether an Authorization header followed).

Everything listens on 127.0.0.1 only, on free ports; every process and thread started is stopped
by the fixture that started it.
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import http.server
import json
import os
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

START_TIMEOUT = 20.0  # docker-registry answers in well under a second; bounds a hang
TOOL_TIMEOUT = 30.0
USER, PASSWORD = "tester", "s3cret-pw"


def run_tool(*argv: str | os.PathLike[str], stdin: bytes | None = None) -> bytes:
    proc = subprocess.run([os.fspath(a) for a in argv], input=stdin, capture_output=True, timeout=TOOL_TIMEOUT,
                          check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(map(str, argv))} exited {proc.returncode}: {proc.stderr.decode()}")
    return proc.stdout


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass(frozen=True, slots=True)
class Pki:
    cert_dir: Path  # ca.crt only: what clients get as --cert-dir
    server_cert: Path
    server_key: Path
    token_cert: Path
    token_key: Path
    ca_key: Path


def make_pki(directory: Path) -> Pki:
    """A CA, a server certificate for 127.0.0.1 signed by it, and a token-signing key pair."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_dir = directory / "certs"
    cert_dir.mkdir()
    ca_key, ca_crt = directory / "ca.key", cert_dir / "ca.crt"
    run_tool("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca_crt,
             "-days", "2", "-subj", "/CN=overlayfuse test CA")
    key, csr, crt = directory / "server.key", directory / "server.csr", directory / "server.crt"
    run_tool("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=127.0.0.1")
    ext = directory / "san.ext"
    ext.write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    run_tool("openssl", "x509", "-req", "-in", csr, "-CA", ca_crt, "-CAkey", ca_key, "-CAcreateserial",
             "-out", crt, "-days", "2", "-extfile", ext)
    token_key, token_crt = directory / "token.key", directory / "token.crt"
    run_tool("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", token_key, "-out", token_crt,
             "-days", "2", "-subj", "/CN=overlayfuse test token issuer")
    return Pki(cert_dir, crt, key, token_crt, token_key, ca_key)


def make_client_cert_dir(pki: Pki, directory: Path) -> Path:
    """A cert dir as containers-certs.d(5) describes it for mutual TLS: ca.crt, client.cert, client.key."""
    directory.mkdir(parents=True)
    ca = pki.cert_dir / "ca.crt"
    (directory / "ca.crt").write_bytes(ca.read_bytes())
    key, csr = directory / "client.key", directory.parent / "client.csr"
    run_tool("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", key, "-out", csr, "-subj", "/CN=client")
    ext = directory.parent / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\n")
    run_tool("openssl", "x509", "-req", "-in", csr, "-CA", ca, "-CAkey", pki.ca_key, "-CAcreateserial",
             "-out", directory / "client.cert", "-days", "2", "-extfile", ext)
    return directory


@dataclass
class RegistryProcess:
    """One docker-registry serving HOST (``127.0.0.1:PORT``) over TLS."""

    directory: Path
    pki: Pki
    auth: dict[str, Any]
    client_certs: Path | None = None  # require a client certificate (mutual TLS); the readiness probe uses this one
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / "registry.log"

    def _config(self) -> Path:
        config = {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": False}, "formatter": "text"},
            "storage": {"filesystem": {"rootdirectory": str(self.directory / "storage")},
                        "delete": {"enabled": True}},
            "http": {"addr": self.host, "tls": {"certificate": str(self.pki.server_cert),
                                                "key": str(self.pki.server_key)}
                     | ({"clientcas": [str(self.pki.cert_dir / "ca.crt")]} if self.client_certs else {})},
            "auth": self.auth,
        }
        path = self.directory / "config.yml"
        path.write_text(json.dumps(config))  # YAML is a superset of JSON
        return path

    def start(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self._config()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)
        context = ssl.create_default_context(cafile=str(self.pki.cert_dir / "ca.crt"))
        if self.client_certs:
            context.load_cert_chain(str(self.client_certs / "client.cert"), str(self.client_certs / "client.key"))
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log_path.read_text()}")
            try:
                conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=context, timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                conn.close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"docker-registry did not answer on {self.host}") from None
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        self.proc = None

    def blob_gets(self, repository: str | None = None) -> list[str]:
        """Digests of the successful blob GETs the access log shows (for REPOSITORY, or any)."""
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if '"GET /v2/' not in line or "/blobs/sha256:" not in line:
                continue
            path = line.split('"GET ', 1)[1].split(" ", 1)[0]
            repo, _, digest = path[len("/v2/"):].partition("/blobs/")
            status = line.split('" ', 1)[1].split(" ", 1)[0] if '" ' in line else ""
            if status in ("200", "206") and (repository is None or repo == repository):
                found.append(digest)
        return found


def htpasswd_auth(directory: Path) -> dict[str, Any]:
    path = directory / "htpasswd"
    path.write_bytes(run_tool("htpasswd", "-Bbn", USER, PASSWORD))
    return {"htpasswd": {"realm": "overlayfuse-test", "path": str(path)}}


@contextlib.contextmanager
def running(registry: RegistryProcess) -> Iterator[RegistryProcess]:
    registry.start()
    try:
        yield registry
    finally:
        registry.stop()


# -- token auth -------------------------------------------------------------------------------


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


class TokenServer:
    """The token service of the distribution token spec, on 127.0.0.1 (plain HTTP)."""

    ISSUER = "overlayfuse-test-issuer"
    SERVICE = "overlayfuse-test-registry"

    def __init__(self, pki: Pki, lifetime: int = 300) -> None:
        self.pki = pki
        self.lifetime = lifetime
        self.requests: list[dict[str, Any]] = []  # {"user":, "scopes":}
        der = run_tool("openssl", "x509", "-in", pki.token_cert, "-outform", "DER")
        self._x5c = base64.b64encode(der).decode()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                server.handle(self)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def realm(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/token"

    def auth_config(self) -> dict[str, Any]:
        return {"token": {"realm": self.realm, "service": self.SERVICE, "issuer": self.ISSUER,
                          "rootcertbundle": str(self.pki.token_cert)}}

    def _sign(self, claims: dict[str, Any]) -> str:
        header = {"typ": "JWT", "alg": "RS256", "x5c": [self._x5c]}
        signing_input = f"{_b64url(json.dumps(header).encode())}.{_b64url(json.dumps(claims).encode())}"
        signature = run_tool("openssl", "dgst", "-sha256", "-sign", self.pki.token_key, stdin=signing_input.encode())
        return f"{signing_input}.{_b64url(signature)}"

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        query = parse_qs(urlsplit(request.path).query)
        scopes = query.get("scope", [])
        user = ""
        header = request.headers.get("Authorization", "")
        if header.startswith("Basic "):
            name, _, password = base64.b64decode(header[6:]).decode().partition(":")
            if (name, password) != (USER, PASSWORD):
                self.requests.append({"user": name, "scopes": scopes, "refused": True})
                request.send_response(401)
                request.send_header("Content-Type", "application/json")
                body = json.dumps({"errors": [{"code": "UNAUTHORIZED", "message": "bad credentials"}]}).encode()
                request.send_header("Content-Length", str(len(body)))
                request.end_headers()
                request.wfile.write(body)
                return
            user = name
        self.requests.append({"user": user, "scopes": scopes})
        access = []
        for scope in scopes:
            kind, _, rest = scope.partition(":")
            name, _, actions = rest.rpartition(":")
            granted = [a for a in actions.split(",") if user or a == "pull"]  # anonymous: pull only
            access.append({"type": kind, "name": name, "actions": granted})
        now = int(time.time())
        claims = {"iss": self.ISSUER, "sub": user, "aud": self.SERVICE, "exp": now + self.lifetime,
                  "nbf": now - 10, "iat": now, "jti": uuid.uuid4().hex, "access": access}
        body = json.dumps({"token": self._sign(claims), "expires_in": self.lifetime}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        request.wfile.write(body)

    def __enter__(self) -> TokenServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


# -- a proxy that misbehaves on purpose ---------------------------------------------------------

_HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "host", "content-length", "proxy-connection"}


@dataclass
class Faults:
    """What the proxy does wrong; each counter is used up as it fires."""

    status_500: int = 0  # answer this many requests (any) with 500
    status_429: int = 0  # answer this many requests (any) with 429 Too Many Requests, Retry-After: 1
    corrupt_blob: str | None = None  # flip a byte of this blob's body (every time)
    cut_blob: str | None = None  # send only half of this blob's body, then drop the connection (once)
    on_cut: Callable[[], None] | None = None  # called after the cut (e.g. stop the registry)
    redirect_blobs: bool = False  # answer blob GETs with a 307 to http://localhost:PORT/redirected/...


class FaultProxy:
    """Plain HTTP on 127.0.0.1 in front of REGISTRY (https), with `Faults`."""

    def __init__(self, registry: RegistryProcess, upstream_auth: str | None = None) -> None:
        self.registry = registry
        self.faults = Faults()
        self.upstream_auth = upstream_auth  # Basic header for redirected GETs (they carry none)
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.context = ssl.create_default_context(cafile=str(registry.pki.cert_dir / "ca.crt"))
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                proxy.handle(self)

            do_HEAD = do_PUT = do_POST = do_PATCH = do_DELETE = do_GET

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def host(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _reply(self, request: http.server.BaseHTTPRequestHandler, status: int, body: bytes = b"",
               headers: dict[str, str] | None = None) -> None:
        request.send_response(status)
        for name, value in (headers or {}).items():
            request.send_header(name, value)
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if request.command != "HEAD":
            request.wfile.write(body)

    def handle(self, request: http.server.BaseHTTPRequestHandler) -> None:
        headers = {k: v for k, v in request.headers.items()}
        self.requests.append((request.command, request.path, dict(headers)))  # as received
        length = int(request.headers.get("Content-Length") or 0)
        body = request.rfile.read(length) if length else None
        faults = self.faults
        if faults.status_500 > 0:
            faults.status_500 -= 1
            self._reply(request, 500, b'{"errors":[{"code":"UNKNOWN","message":"injected failure"}]}',
                        {"Content-Type": "application/json"})
            return
        if faults.status_429 > 0:
            faults.status_429 -= 1
            self._reply(request, 429, b'{"errors":[{"code":"TOOMANYREQUESTS","message":"slow down"}]}',
                        {"Content-Type": "application/json", "Retry-After": "1"})
            return
        path = request.path
        is_blob_get = request.command == "GET" and "/blobs/sha256:" in path
        if is_blob_get and faults.redirect_blobs and not path.startswith("/redirected/"):
            self._reply(request, 307, headers={"Location": f"http://localhost:{self.port}/redirected{path}"})
            return
        if path.startswith("/redirected/"):
            path = path[len("/redirected"):]
            headers.pop("Authorization", None)
            if self.upstream_auth:
                headers["Authorization"] = self.upstream_auth
        try:
            conn = http.client.HTTPSConnection("127.0.0.1", self.registry.port, context=self.context, timeout=30)
            forward = {k: v for k, v in headers.items() if k.lower() not in _HOP_HEADERS}
            forward["Host"] = self.host
            forward["X-Forwarded-Proto"] = "http"
            conn.request(request.command, path, body=body, headers=forward)
            upstream = conn.getresponse()
            data = upstream.read()
            conn.close()
        except OSError as exc:  # the registry is down: what a load balancer says
            self._reply(request, 502, str(exc).encode())
            return
        out_headers = {k: v for k, v in upstream.getheaders() if k.lower() not in _HOP_HEADERS}
        digest = path.rsplit("/", 1)[-1]
        if is_blob_get and upstream.status == 200 and digest == faults.corrupt_blob and data:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        if is_blob_get and upstream.status == 200 and digest == faults.cut_blob:
            faults.cut_blob = None
            request.send_response(200)
            for name, value in out_headers.items():
                request.send_header(name, value)
            request.send_header("Content-Length", str(len(data)))
            request.end_headers()
            request.wfile.write(data[: len(data) // 2])
            request.wfile.flush()
            if faults.on_cut is not None:
                faults.on_cut()
            request.close_connection = True
            with contextlib.suppress(OSError):
                request.connection.shutdown(socket.SHUT_RDWR)
            return
        self._reply(request, upstream.status, data, out_headers)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)
