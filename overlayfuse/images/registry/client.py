"""One session with one registry: ping, authentication, retries and redirects (OCI distribution API).

- ``GET /v2/`` first: 200 means no auth; a 401 carries the challenge (``WWW-Authenticate``). A Basic
  challenge is answered with the credentials on every request; a Bearer one with a token fetched from
  its realm (``service`` and ``scope`` as parameters, the credentials as Basic auth, or none for an
  anonymous token), cached per scope until shortly before it expires, and fetched again on a 401.
- Connection errors, 429 and 5xx are retried with exponential backoff, bounded in count and time
  (``Retry-After`` honoured up to the bound). Everything else fails at once with one line.
- Redirects (a blob in object storage) are followed by hand so that the Authorization header goes
  only to the registry's own host, never to another one.

httpx does HTTP and TLS; this module only adds what the distribution spec asks for. The client is
shared by the download threads of a pull (httpx's Client is thread-safe; the token cache is locked).
"""

from __future__ import annotations

import base64
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from urllib.parse import urljoin, urlsplit

import httpx

from .credentials import Credentials, find_credentials
from .reference import RegistryError, normalize_registry
from .tls import ssl_context

log = logging.getLogger(__name__)

#: Seconds to wait for a connection, and for any read on it (a stalled registry must not hang a pull).
CONNECT_TIMEOUT = 15.0
READ_TIMEOUT = 60.0
#: Redirect hops followed before giving up (object storage needs one).
MAX_REDIRECTS = 5
#: Longest single wait between retries, and the whole time retries of one request may take.
MAX_RETRY_DELAY = 30.0
RETRY_BUDGET = 180.0
#: A token is renewed this many seconds before the registry says it expires (clocks and latency).
TOKEN_MARGIN = 10.0
#: Lifetime the token spec says to assume when the token server gives none.
DEFAULT_TOKEN_LIFETIME = 60.0
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
_AUTH_PARAM = re.compile(r'([A-Za-z_][\w-]*)\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^\s,]*))')


@dataclass(frozen=True, slots=True)
class Options:
    """The flags pull, push and login share (podman's names)."""

    creds: Credentials | None = None  # --creds; else the auth files
    authfile: str | None = None
    cert_dir: str | None = None
    tls_verify: bool = True
    retries: int = 3
    retry_delay: float = 1.0  # first wait; doubled each time


@dataclass(frozen=True, slots=True)
class Challenge:
    """What a 401 asked for: ``basic`` or ``bearer``, with its parameters (realm, service, scope)."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict)


def parse_challenge(header: str) -> Challenge | None:
    """The first Basic or Bearer challenge of a ``WWW-Authenticate`` header, or None."""
    scheme, _, rest = header.strip().partition(" ")
    if scheme.lower() not in ("basic", "bearer"):
        return None
    params = {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3)).replace('\\"', '"')
              for m in _AUTH_PARAM.finditer(rest)}
    return Challenge(scheme.lower(), params)


def _registry_message(response: httpx.Response) -> str:
    """The registry's own explanation (``errors[0].message``), if the body has one."""
    try:
        body = response.json()
        errors = body.get("errors") if isinstance(body, dict) else None
        if errors and isinstance(errors[0], dict):
            code, message = errors[0].get("code"), errors[0].get("message")
            return f": {code.lower().replace('_', ' ') if isinstance(code, str) else ''}" + \
                (f" ({message})" if message else "")
    except (ValueError, httpx.ResponseNotRead, AttributeError, IndexError, TypeError):
        pass
    return ""


_STATUS_WORDS = {401: "unauthorized: wrong or missing credentials", 403: "denied (no access)",
                 404: "not found", 405: "not allowed by this registry", 416: "range not satisfiable"}


class Session:
    """One registry (``host:port``), for one command."""

    def __init__(self, registry: str, options: Options) -> None:
        self.registry = registry  # the API host
        self.label = normalize_registry(registry)
        self.options = options
        self.creds = options.creds or find_credentials(self.label, options.authfile)
        context = ssl_context(registry, options.cert_dir, options.tls_verify)
        self.client = httpx.Client(verify=context, follow_redirects=False, trust_env=False,
                                   timeout=httpx.Timeout(READ_TIMEOUT, connect=CONNECT_TIMEOUT))
        self.base: str | None = None
        self.challenge: Challenge | None = None
        self._tokens: dict[tuple[str, ...], tuple[str, float]] = {}
        self._lock = threading.Lock()
        self.token_requests = 0  # for --debug and the tests' curiosity

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- errors ---------------------------------------------------------------------------------

    def fail(self, what: str, response: httpx.Response) -> RegistryError:
        """One line for a refusal: registry, what was asked, what it said."""
        if not response.is_stream_consumed:
            try:
                response.read()
            except (httpx.HTTPError, httpx.StreamError):
                pass
        words = _STATUS_WORDS.get(response.status_code, f"HTTP {response.status_code} {response.reason_phrase}")
        hint = f" (try: overlayctl login {self.label})" if response.status_code == 401 else ""
        return RegistryError(f"{self.label}: {what}: {words}{_registry_message(response)}{hint}")

    # -- ping and auth --------------------------------------------------------------------------

    def ping(self) -> None:
        """``GET /v2/``: learn the scheme (https, or http with --tls-verify=false) and the challenge."""
        if self.base is not None:
            return
        schemes = ["https"] if self.options.tls_verify else ["https", "http"]
        last: Exception | None = None
        for scheme in schemes:
            base = f"{scheme}://{self.registry}"
            try:
                response = self._send_retrying(functools.partial(self.client.build_request, "GET", f"{base}/v2/"),
                                               f"{base}/v2/", retry_transport=scheme == schemes[-1])
            except RegistryError as exc:
                last = exc
                continue
            response.close()
            self.base = base
            if response.status_code == 401:
                self.challenge = parse_challenge(response.headers.get("www-authenticate", ""))
                if self.challenge is None:
                    raise RegistryError(f"{self.label}: asks for an authentication scheme we do not know: "
                                        f"{response.headers.get('www-authenticate')!r}")
            elif response.status_code != 200:
                raise self.fail("/v2/ (is this a registry?)", response)
            log.debug("%s: %s, auth %s", self.label, base, self.challenge and self.challenge.scheme)
            return
        assert last is not None
        raise last

    def check_login(self) -> None:
        """Prove the credentials: ``GET /v2/`` with Basic auth, or a token with no scope for Bearer."""
        self.ping()
        if self.challenge is None:
            return  # the registry asks for nothing: any credentials do
        if self.challenge.scheme == "bearer":
            self._token((), self.challenge, renew=True)
            return
        response = self._send_retrying(
            lambda: self.client.build_request("GET", f"{self.base}/v2/",
                                              headers={"Authorization": self._basic() or ""}),
            "/v2/")
        response.close()
        if response.status_code != 200:
            raise self.fail("login", response)

    def _basic(self) -> str | None:
        if self.creds is None:
            return None
        raw = f"{self.creds.username}:{self.creds.password}".encode()
        return "Basic " + base64.b64encode(raw).decode()

    def _token(self, scopes: tuple[str, ...], challenge: Challenge, renew: bool = False) -> str:
        with self._lock:
            cached = self._tokens.get(scopes)
            if cached and not renew and cached[1] > time.monotonic():
                return cached[0]
        realm = challenge.params.get("realm")
        if not realm:
            raise RegistryError(f"{self.label}: a Bearer challenge without a realm")
        params: list[tuple[str, str]] = []
        if challenge.params.get("service"):
            params.append(("service", challenge.params["service"]))
        params.extend(("scope", scope) for scope in scopes)
        headers = {}
        basic = self._basic()
        if basic:
            headers["Authorization"] = basic
        url = str(httpx.URL(realm, params=params))
        response = self._send_retrying(lambda: self.client.build_request("GET", url, headers=headers), url)
        self.token_requests += 1
        if response.status_code != 200:
            raise self.fail(f"token for {' '.join(scopes) or 'the registry'} from {urlsplit(realm).netloc}", response)
        try:
            body = response.json()
            token = body.get("token") or body.get("access_token")
            lifetime = float(body.get("expires_in") or DEFAULT_TOKEN_LIFETIME)
        except (ValueError, AttributeError, TypeError):
            token = None
        if not isinstance(token, str) or not token:
            raise RegistryError(f"{self.label}: the token server {urlsplit(realm).netloc} sent no token")
        expiry = time.monotonic() + max(lifetime - TOKEN_MARGIN, lifetime / 2)
        with self._lock:
            self._tokens[scopes] = (token, expiry)
        log.debug("%s: token for %s, %ss", self.label, scopes, lifetime)
        return token

    def _authorization(self, scopes: tuple[str, ...], renew: bool = False,
                       challenge: Challenge | None = None) -> str | None:
        challenge = challenge or self.challenge
        if challenge is None:
            return None
        if challenge.scheme == "basic":
            return self._basic()
        return "Bearer " + self._token(scopes, challenge, renew)

    # -- requests -------------------------------------------------------------------------------

    def _send_retrying(self, build: Callable[[], httpx.Request], what: str, stream: bool = False,
                       retry_transport: bool = True) -> httpx.Response:
        """Send, retrying connection errors, 429 and 5xx with backoff; the last answer or error wins."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                response = self.client.send(build(), stream=stream)
            except httpx.TransportError as exc:
                if not retry_transport or not self._wait_before_retry(attempt, started, None, what, str(exc)):
                    raise RegistryError(f"{self.label}: {what}: {_transport_words(exc)}") from None
                attempt += 1
                continue
            if response.status_code in _RETRY_STATUS and self._wait_before_retry(
                    attempt, started, response.headers.get("retry-after"), what, f"HTTP {response.status_code}"):
                response.close()
                attempt += 1
                continue
            return response

    def _wait_before_retry(self, attempt: int, started: float, retry_after: str | None, what: str,
                           why: str) -> bool:
        """Sleep before retry ATTEMPT+1, or say False when the count or the time budget is spent."""
        if attempt >= self.options.retries:
            return False
        delay = min(self.options.retry_delay * (2 ** attempt), MAX_RETRY_DELAY)
        if retry_after and retry_after.isdigit():
            delay = min(max(delay, float(retry_after)), MAX_RETRY_DELAY)
        if time.monotonic() - started + delay > RETRY_BUDGET:
            return False
        log.info("%s: %s: %s; retrying in %.1fs (%d/%d)", self.label, what, why, delay, attempt + 1,
                    self.options.retries)
        time.sleep(delay)
        return True

    def request(self, method: str, path: str, scopes: Iterable[str], what: str, *,
                headers: Mapping[str, str] | None = None,
                content: bytes | Callable[[], Iterator[bytes]] | None = None,
                params: Mapping[str, str] | None = None, stream: bool = False) -> httpx.Response:
        """METHOD PATH (``/v2/...`` or a Location URL) with auth for SCOPES; redirects followed.
        Returns the final response, whatever its status (see `fail`); close it if STREAM."""
        self.ping()
        assert self.base is not None
        scopes = tuple(scopes)
        url = urljoin(self.base + "/", path)
        if params:
            url = str(httpx.URL(url).copy_merge_params(dict(params)))
        renewed = False
        hops = 0
        while True:
            registry_host = urlsplit(url).netloc == urlsplit(self.base).netloc
            authorization = self._authorization(scopes) if registry_host else None

            # Every value a redirect may change is bound now, not looked up when a retry calls this.
            def build(url: str = url, authorization: str | None = authorization, method: str = method,
                      content: bytes | Callable[[], Iterator[bytes]] | None = content) -> httpx.Request:
                extra = dict(headers or {})
                if authorization:
                    extra["Authorization"] = authorization
                body = content() if callable(content) else content
                return self.client.build_request(method, url, headers=extra, content=body)

            response = self._send_retrying(build, what, stream=stream)
            if response.status_code == 401 and registry_host and self.challenge is not None:
                challenge = parse_challenge(response.headers.get("www-authenticate", "")) or self.challenge
                if challenge.scheme == "bearer" and not renewed:
                    # An expired token, or one the registry wants renewed: ask the token server once more.
                    response.close()
                    renewed = True
                    self._authorization(scopes, renew=True, challenge=challenge)
                    continue
                if self.creds is None:
                    response.close()
                    raise RegistryError(f"{self.label}: {what}: unauthorized: credentials needed "
                                        f"(overlayctl login {self.label}, or --creds)")
            if response.status_code in (301, 302, 303, 307, 308) and "location" in response.headers:
                hops += 1
                if hops > MAX_REDIRECTS:
                    response.close()
                    raise RegistryError(f"{self.label}: {what}: more than {MAX_REDIRECTS} redirects")
                url = urljoin(url, response.headers["location"])
                response.close()
                log.debug("%s: %s redirected to %s", self.label, what, urlsplit(url).netloc)
                if response.status_code == 303:
                    method, content = "GET", None
                continue
            return response


def _transport_words(exc: httpx.TransportError) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.ConnectError):
        return f"cannot connect: {text}"
    if isinstance(exc, httpx.TimeoutException):
        return f"timed out: {text}"
    return f"connection failed: {text}"

