"""An azure-core HTTP transport over the standard library's ``http.client``.

The storage SDKs send every request through a transport; their default is
``requests`` over ``urllib3``.  Measured in a 2 GiB initial sync, that layer
took about 1 ms of CPU per call before a byte reached the socket (reading
the environment's proxy variables twice per call, cookie jars, adapters,
urllib3's pool) and 6 ms to stream a 6 MiB segment in 256 KiB pieces: about
40% of the master target's CPU went to storage calls, most of it there
(docs/performance.md, round fifteen).  azure-core lets a client bring its own
transport (``transport=``), so this one keeps the SDK for everything it is
for (signing, retries, error mapping, XML) and replaces only the sending:
``http.client`` connections kept per host, a response read into one buffer.

What it keeps from ``requests``' behaviour, because an operator relies on it:

* proxies from ``HTTP_PROXY`` / ``HTTPS_PROXY`` / ``NO_PROXY`` (read once,
  when the transport is made), or the ``proxies`` a caller passes; HTTPS goes
  through the proxy with ``CONNECT``;
* certificate verification against certifi's bundle (what ``requests``
  uses), ``REQUESTS_CA_BUNDLE`` or ``connection_verify`` naming another;
* the connect timeout and the read timeout (per call too), and the SDK's
  error types: a request that could not be sent raises ServiceRequestError,
  one whose answer broke off ServiceResponseError (both retried by the SDK),
  a timeout their ``Timeout`` variants, a body cut short IncompleteReadError.

A connection goes back to its host's pool only after its answer was read to
the end; one the server closed while idle is noticed (readable while idle)
and dropped before use.  Redirects are not followed (the SDK's redirect
policy does that, as it did over ``requests``).
"""

from __future__ import annotations

import base64
import contextlib
import http.client
import os
import select
import socket
import ssl
import threading
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator, MutableMapping
from typing import Any

from azure.core.exceptions import (
    AzureError,
    IncompleteReadError,
    ServiceRequestError,
    ServiceRequestTimeoutError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.pipeline.transport import HttpTransport
from azure.core.rest._http_response_impl import HttpResponseImpl
from azure.core.utils import case_insensitive_dict

CONNECT_TIMEOUT = 300.0
"""Connect timeout when neither the client nor the call sets one, in seconds (azure-core's)."""

READ_TIMEOUT = 300.0
"""Read timeout when neither the client nor the call sets one, in seconds (azure-core's)."""

BLOCK_SIZE = 64 << 20
"""Largest piece a streamed answer is handed on in, in bytes.  An answer of known length
shorter than this (every segment; the SDK asks for larger blobs in ranges of at most 32 MiB)
is read in one piece, straight from the socket into the bytes the SDK keeps."""

IDLE_PER_HOST = 8
"""Idle connections kept per host (more are closed when returned)."""

SEND_BLOCK = 1 << 20
"""Piece a body given as a stream is read and sent in, in bytes (http.client's is 8 KiB)."""

_Key = tuple[str, str, int, str | None]  # scheme, host, port, proxy URL


class _Connection:
    """One ``http.client`` connection and the pool it goes back to."""

    __slots__ = ("conn", "key", "pool")

    def __init__(self, conn: http.client.HTTPConnection, key: _Key, pool: HttpClientTransport):
        self.conn = conn
        self.key = key
        self.pool = pool


class _Chunks:
    """The body of a streamed answer, in pieces of up to the transport's block size.

    azure-core calls it ``stream_download_generator``.  Reading to the end
    returns the connection to its pool; an error closes it.
    """

    def __init__(self, pipeline: Any, response: Response, **kwargs: Any) -> None:
        decompress = kwargs.pop("decompress", True)
        if kwargs:
            raise TypeError(f"unexpected keyword argument {next(iter(kwargs))!r}")
        self.response = response
        self.pipeline = pipeline
        encoding = (response.headers.get("Content-Encoding") or "").lower()
        self._inflate = (
            zlib.decompressobj(zlib.MAX_WBITS | 32)  # gzip or zlib, told apart by the header
            if decompress and encoding in ("gzip", "deflate")
            else None
        )
        self.content_length = int(response.headers.get("Content-Length") or 0)

    def __len__(self) -> int:
        return self.content_length

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        raw = self.response.internal_response
        while True:
            try:
                chunk = raw.read(self.response.block_size)
            except TimeoutError as exc:
                self.response.close()
                raise ServiceResponseTimeoutError(str(exc), error=exc) from exc
            except http.client.IncompleteRead as exc:
                self.response.close()
                raise IncompleteReadError(str(exc), error=exc) from exc
            except (OSError, http.client.HTTPException) as exc:
                self.response.close()
                raise ServiceResponseError(str(exc), error=exc) from exc
            if not chunk:
                if raw.length:  # http.client returns what came before the hang-up, no error
                    self.response.close()
                    missing = f"{raw.length} bytes of the answer missing"
                    raise IncompleteReadError(missing, error=http.client.IncompleteRead(b""))
                if self._inflate is not None:
                    rest, self._inflate = self._inflate.flush(), None
                    if rest:
                        return rest
                self.response.close()
                raise StopIteration
            if self._inflate is None:
                return chunk
            out = self._inflate.decompress(chunk)
            if out:
                return out


class Response(HttpResponseImpl):
    """An ``azure.core.rest`` response over an ``http.client`` answer."""

    def __init__(self, request: Any, connection: _Connection, raw: http.client.HTTPResponse):
        headers = case_insensitive_dict(raw.getheaders())
        super().__init__(
            request=request,
            internal_response=raw,
            status_code=raw.status,
            reason=raw.reason,
            headers=headers,
            content_type=headers.get("Content-Type"),
            block_size=BLOCK_SIZE,
            stream_download_generator=_Chunks,
        )
        self._connection: _Connection | None = connection

    def close(self) -> None:
        """Done with the answer: its connection is reused if it was read to the end."""
        if self.is_closed:
            return
        self._is_closed = True
        connection, self._connection = self._connection, None
        raw = self._internal_response
        if connection is None:
            raw.close()
            return
        if raw.isclosed() and not raw.will_close:
            connection.pool._release(connection)
        else:
            raw.close()
            connection.conn.close()


class HttpClientTransport(HttpTransport):
    """azure-core transport over ``http.client``; one per process serves every client.

    Keyword arguments are azure-core's connection settings
    (``connection_timeout``, ``read_timeout``, ``connection_verify``,
    ``connection_cert``), as the default transport takes them; each may also
    be given per call.
    """

    def __init__(self, **kwargs: Any) -> None:
        self.connection_timeout = kwargs.get("connection_timeout", CONNECT_TIMEOUT)
        self.read_timeout = kwargs.get("read_timeout", READ_TIMEOUT)
        self.verify = kwargs.get("connection_verify", True)
        self.cert = kwargs.get("connection_cert")
        self._env_proxies = {
            k: v for k, v in urllib.request.getproxies_environment().items() if k != "no"
        }
        self._bypass: dict[str, bool] = {}
        self._idle: dict[_Key, list[http.client.HTTPConnection]] = {}
        self._contexts: dict[tuple[Any, Any], ssl.SSLContext] = {}
        self._lock = threading.Lock()

    # -- HttpTransport ------------------------------------------------------------------

    def open(self) -> None:
        """Nothing to open: connections are made per host when first needed."""

    def close(self) -> None:
        """Close the idle connections (the transport stays usable: clients share it)."""
        with self._lock:
            idle, self._idle = self._idle, {}
        for conns in idle.values():
            for conn in conns:
                conn.close()

    def __enter__(self) -> HttpClientTransport:
        return self

    def __exit__(self, *args: Any) -> None:
        # A client's ``with`` must not close what other clients share.
        return None

    def send(self, request: Any, **kwargs: Any) -> Response:
        """Send ``request``; its answer, read whole unless ``stream=True``."""
        if getattr(request, "files", None):
            raise ValueError("this transport does not send multipart form files")
        stream = kwargs.pop("stream", False)
        connect_timeout = kwargs.pop("connection_timeout", self.connection_timeout)
        read_timeout = kwargs.pop("read_timeout", self.read_timeout)
        verify = kwargs.pop("connection_verify", self.verify)
        cert = kwargs.pop("connection_cert", self.cert)
        proxies = kwargs.pop("proxies", None)
        url = urllib.parse.urlsplit(request.url)
        scheme, host = url.scheme.lower(), url.hostname or ""
        if scheme not in ("http", "https") or not host:
            raise ServiceRequestError(f"cannot send to {request.url!r}: not an http(s) URL")
        port = url.port or (443 if scheme == "https" else 80)
        proxy = self._proxy_for(scheme, host, proxies)
        target = urllib.parse.urlunsplit(("", "", url.path or "/", url.query, ""))
        if proxy is not None and scheme == "http":
            target = urllib.parse.urlunsplit((scheme, url.netloc, url.path or "/", url.query, ""))
        key: _Key = (scheme, host, port, proxy)
        connection = self._acquire(key, connect_timeout, verify, cert)
        conn = connection.conn
        with _failing(conn, ServiceRequestTimeoutError, ServiceRequestError):  # not sent
            if conn.sock is None:
                conn.timeout = connect_timeout
                conn.connect()
            conn.sock.settimeout(read_timeout)
        body = request.data if request.data is not None else getattr(request, "content", None)
        with _failing(conn, ServiceResponseTimeoutError, ServiceResponseError):
            conn.request(request.method, target, body=body, headers=dict(request.headers))
            raw = conn.getresponse()
        response = Response(request, connection, raw)
        if not stream:
            response.read()
        return response

    # -- connections --------------------------------------------------------------------

    def _acquire(self, key: _Key, timeout: float, verify: Any, cert: Any) -> _Connection:
        """An idle connection to ``key`` still open, or a new (unconnected) one."""
        conn: http.client.HTTPConnection
        with self._lock:
            idle = self._idle.get(key)
            while idle:
                conn = idle.pop()
                if conn.sock is not None and not _dropped(conn.sock):
                    return _Connection(conn, key, self)
                conn.close()
        scheme, host, port, proxy = key
        if proxy is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(
                    host,
                    port,
                    timeout=timeout,
                    context=self._context(verify, cert),
                    blocksize=SEND_BLOCK,
                )
            else:
                conn = http.client.HTTPConnection(host, port, timeout=timeout, blocksize=SEND_BLOCK)
            return _Connection(conn, key, self)
        p = urllib.parse.urlsplit(proxy)
        if p.scheme != "http":
            raise ServiceRequestError(
                f"cannot reach {host} through proxy {p.scheme}://{p.hostname}: only http:// "
                "proxies are supported (HTTPS still goes through them end to end, with CONNECT)"
            )
        p_port = p.port or 80
        proxy_headers = {}
        if p.username is not None:
            login = f"{urllib.parse.unquote(p.username)}:{urllib.parse.unquote(p.password or '')}"
            proxy_headers["Proxy-Authorization"] = "Basic " + base64.b64encode(
                login.encode()
            ).decode("ascii")
        if scheme == "https":
            conn = http.client.HTTPSConnection(
                p.hostname or "",
                p_port,
                timeout=timeout,
                context=self._context(verify, cert),
                blocksize=SEND_BLOCK,
            )
            conn.set_tunnel(host, port, headers=proxy_headers)
        else:
            conn = _ProxiedHTTPConnection(
                p.hostname or "", p_port, timeout=timeout, blocksize=SEND_BLOCK
            )
            conn.proxy_headers = proxy_headers
        return _Connection(conn, key, self)

    def _release(self, connection: _Connection) -> None:
        with self._lock:
            idle = self._idle.setdefault(connection.key, [])
            if len(idle) < IDLE_PER_HOST:
                idle.append(connection.conn)
                return
        connection.conn.close()

    def _context(self, verify: Any, cert: Any) -> ssl.SSLContext:
        """The TLS context for ``verify`` (True, False or a CA bundle path) and ``cert``."""
        with self._lock:
            context = self._contexts.get((verify, cert))
            if context is not None:
                return context
        if verify is False:
            context = ssl._create_unverified_context()  # the caller asked for no verification
        else:
            cafile = verify if isinstance(verify, str) else _default_ca_bundle()
            context = ssl.create_default_context(cafile=cafile)
        if cert:
            certfile, keyfile = (cert, None) if isinstance(cert, str) else cert
            context.load_cert_chain(certfile, keyfile)
        with self._lock:
            return self._contexts.setdefault((verify, cert), context)

    def _proxy_for(
        self, scheme: str, host: str, proxies: MutableMapping[str, str] | None
    ) -> str | None:
        """The proxy URL a request to ``host`` goes through, or None."""
        if proxies:
            proxy = proxies.get(scheme) or proxies.get("all")
        elif not self._env_proxies:
            return None
        else:
            bypass = self._bypass.get(host)
            if bypass is None:
                bypass = bool(urllib.request.proxy_bypass(host))  # NO_PROXY
                self._bypass[host] = bypass
            proxy = (
                None if bypass else self._env_proxies.get(scheme) or self._env_proxies.get("all")
            )
        if proxy and "://" not in proxy:
            proxy = "http://" + proxy  # as requests reads "proxy:3128"
        return proxy or None


class _ProxiedHTTPConnection(http.client.HTTPConnection):
    """Plain HTTP through a proxy: absolute URLs, the proxy's credentials on every request."""

    proxy_headers: dict[str, str] = {}

    def putrequest(self, method: str, url: str, *args: Any, **kwargs: Any) -> None:
        super().putrequest(method, url, *args, **kwargs)
        for name, value in self.proxy_headers.items():
            self.putheader(name, value)


@contextlib.contextmanager
def _failing(
    conn: http.client.HTTPConnection, on_timeout: type[AzureError], on_error: type[AzureError]
) -> Iterator[None]:
    """Failures of ``conn`` as the SDK's errors (``on_timeout`` for a timeout); ``conn`` closed."""
    try:
        yield
    except TimeoutError as exc:
        conn.close()
        raise on_timeout(str(exc), error=exc) from exc
    except (OSError, http.client.HTTPException) as exc:
        conn.close()
        raise on_error(str(exc), error=exc) from exc


def _dropped(sock: socket.socket) -> bool:
    """True if an idle connection's socket is readable: the server closed it (or sent junk)."""
    try:
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


def _default_ca_bundle() -> str | None:
    """The CA bundle ``requests`` would use: ``REQUESTS_CA_BUNDLE``, else certifi's."""
    for name in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        if os.environ.get(name):
            return os.environ[name]
    try:
        import certifi
    except ImportError:  # the system's store
        return None
    return certifi.where()
