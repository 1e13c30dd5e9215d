"""ferry.httptransport: the storage SDKs' HTTP transport over http.client.

Every storage call of every component goes through it, so it is tested for
what an operator relies on: the SDK's calls work against real Azurite, a
connection is reused and one the server dropped is replaced, failures raise
the errors the SDK retries, proxies from the environment (CONNECT for
HTTPS) and certificate verification behave as they did over ``requests``.
Servers here are real sockets, scripted to misbehave.
"""

from __future__ import annotations

import base64
import gzip
import http.client
import os
import socket
import socketserver
import ssl
import threading
import time
import uuid
from collections.abc import Callable

import pytest
from azure.core.exceptions import (
    IncompleteReadError,
    ServiceRequestError,
    ServiceResponseError,
    ServiceResponseTimeoutError,
)
from azure.core.rest import HttpRequest

from ferry import pki
from ferry import storage as storage_mod
from ferry.httptransport import HttpClientTransport
from ferry.storage import Storage


class Scripted:
    """A TCP server on 127.0.0.1 whose every connection is handed to ``handle(sock)``."""

    def __init__(self, handle: Callable[[socket.socket], None], tls: ssl.SSLContext | None = None):
        outer = self
        self.connections = 0

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                outer.connections += 1
                sock = self.request
                if tls is not None:
                    try:
                        sock = tls.wrap_socket(sock, server_side=True)
                    except (ssl.SSLError, OSError):
                        return
                handle(sock)

        socketserver.ThreadingTCPServer.allow_reuse_address = True
        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def read_request(sock: socket.socket) -> tuple[str, dict[str, str], bytes] | None:
    """One HTTP request from ``sock``: request line, headers (lower-case names), body."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    line, *rest = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (h.split(":", 1) for h in rest)}
    length = int(headers.get("content-length", 0))
    while len(body) < length:
        body += sock.recv(65536)
    return line, headers, body


def answer(sock: socket.socket, body: bytes, *extra: str, status: str = "200 OK") -> None:
    head = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *extra, "", ""]
    sock.sendall("\r\n".join(head).encode() + body)


@pytest.fixture
def transport():
    made = HttpClientTransport(connection_timeout=5, read_timeout=5)
    yield made
    made.close()


def get(transport: HttpClientTransport, url: str, **kwargs):
    return transport.send(HttpRequest("GET", url), **kwargs)


# -- the SDK over real Azurite ---------------------------------------------------------


def test_storage_calls_work_over_azurite_on_one_connection_per_endpoint(azurite, monkeypatch):
    shared = storage_mod._CLIENT_OPTS["transport"]
    assert isinstance(shared, HttpClientTransport)  # what every component's Storage uses
    shared.close()  # no idle connection left from other tests
    connects = []
    original = http.client.HTTPConnection.connect

    def counting(self):
        if threading.current_thread() is me:  # not another test's leftover thread
            connects.append((self.host, self.port))
        return original(self)

    me = threading.current_thread()

    monkeypatch.setattr(http.client.HTTPConnection, "connect", counting)
    storage = Storage(azurite.connection_string)
    name = "h" + uuid.uuid4().hex[:12]
    data = os.urandom(5 << 20) + b"tail"
    storage.put(name, "segment", data)
    assert storage.get(name, "segment") == data
    assert storage.exists(name, "segment")
    storage.delete(name, "segment")
    assert not storage.exists(name, "segment")
    storage.put_json(name, "cursor.json", {"seq": 7})
    assert storage.get_json(name, "cursor.json") == {"seq": 7}
    for i in range(3):
        storage.send(name, {"seq": i})
    got = storage.receive(name, count=32)
    assert sorted(m.body["seq"] for m in got) == [0, 1, 2]
    for message in got:
        storage.delete_message(name, message)
    assert storage.receive(name) == []
    storage.delete_queue(name)
    # The blob endpoint and the queue endpoint: one connection each, reused by every call.
    assert len(connects) == 2, connects
    assert len(set(connects)) == 2


def test_a_missing_blob_is_still_not_found(storage):
    from ferry.errors import NotFound

    name = "h" + uuid.uuid4().hex[:12]
    storage.ensure_container(name)
    with pytest.raises(NotFound):
        storage.get(name, "absent")


# -- connections ------------------------------------------------------------------------


def test_a_connection_the_server_dropped_while_idle_is_replaced(transport):
    def once(sock):  # answers one request, then hangs up without saying so
        if read_request(sock):
            answer(sock, b"hello")
        sock.close()

    server = Scripted(once)
    try:
        for _ in range(3):
            response = get(transport, f"http://127.0.0.1:{server.port}/x")
            assert (response.status_code, response.read()) == (200, b"hello")
            time.sleep(0.05)  # the hang-up reaches the idle connection
        assert server.connections == 3
    finally:
        server.close()


def test_a_connection_is_reused_only_after_its_answer_was_read_to_the_end(transport):
    def keep_alive(sock):
        while read_request(sock):
            answer(sock, b"x" * 100_000)

    server = Scripted(keep_alive)
    try:
        url = f"http://127.0.0.1:{server.port}/x"
        first = get(transport, url, stream=True)
        second = get(transport, url)  # the first one's connection is still busy
        assert second.read() == b"x" * 100_000
        assert server.connections == 2
        assert b"".join(first.iter_bytes()) == b"x" * 100_000
        for _ in range(3):
            assert get(transport, url).read() == b"x" * 100_000
        assert server.connections == 2
        half = get(transport, url, stream=True)
        half.close()  # not read: its connection is closed, never handed to another call
        assert get(transport, url).read() == b"x" * 100_000
    finally:
        server.close()


# -- failures the SDK retries ---------------------------------------------------------------


def test_nobody_listening_is_a_request_error(transport):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServiceRequestError):
        get(transport, f"http://127.0.0.1:{port}/x")


def test_a_silent_server_is_a_response_timeout(transport):
    def silent(sock):
        read_request(sock)
        time.sleep(3)

    server = Scripted(silent)
    try:
        started = time.monotonic()
        with pytest.raises(ServiceResponseTimeoutError):
            get(transport, f"http://127.0.0.1:{server.port}/x", read_timeout=0.5)
        assert time.monotonic() - started < 2.5
    finally:
        server.close()


def test_an_answer_cut_short_is_an_incomplete_read(transport):
    def cut(sock):
        if read_request(sock):
            sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"y" * 400)
        sock.close()

    server = Scripted(cut)
    try:
        url = f"http://127.0.0.1:{server.port}/x"
        with pytest.raises(IncompleteReadError):
            get(transport, url)
        streamed = get(transport, url, stream=True)
        with pytest.raises(IncompleteReadError):
            list(streamed.stream_download(None))
    finally:
        server.close()


def test_a_hang_up_before_the_answer_is_a_response_error(transport):
    def hang_up(sock):
        read_request(sock)
        sock.close()

    server = Scripted(hang_up)
    try:
        with pytest.raises(ServiceResponseError):
            get(transport, f"http://127.0.0.1:{server.port}/x")
    finally:
        server.close()


# -- bodies -----------------------------------------------------------------------------


def test_bodies_go_out_whole_and_encoded_answers_are_decoded_when_asked(transport):
    seen = []
    packed = gzip.compress(b"z" * 50_000)

    def echo(sock):
        while request := read_request(sock):
            seen.append(request)
            answer(sock, packed, "Content-Encoding: gzip")

    server = Scripted(echo)
    try:
        url = f"http://127.0.0.1:{server.port}/blob?comp=x"
        body = os.urandom(3 << 20)
        response = transport.send(HttpRequest("PUT", url, content=body))
        assert response.read() == b"z" * 50_000
        line, headers, received = seen[-1]
        assert line == "PUT /blob?comp=x HTTP/1.1"
        assert received == body and headers["content-length"] == str(len(body))
        raw = get(transport, url, stream=True)
        assert b"".join(raw.stream_download(None, decompress=False)) == packed
    finally:
        server.close()


# -- proxies and certificates -------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_server_context(tmp_path_factory):
    base = tmp_path_factory.mktemp("pki")
    pki.make_ca(base / "ca")
    pki.issue(base / "ca", base, "storage", ["localhost", "127.0.0.1"])
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(base / "storage.pem", base / "storage.key")
    return context, str(base / "ca" / "ca.pem")


def https_server() -> Callable[[ssl.SSLContext], Scripted]:
    def make(context):
        def hello(sock):
            while read_request(sock):
                answer(sock, b"over tls")

        return Scripted(hello, tls=context)

    return make


class ConnectProxy:
    """An HTTP proxy: tunnels CONNECT, forwards absolute-URL requests; records what it saw."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.server = Scripted(self._serve)
        self.url = f"http://user:p%40ss@127.0.0.1:{self.server.port}"

    def _serve(self, sock):
        request = read_request(sock)
        if request is None:
            return
        line, headers, _ = request
        self.seen.append((line, headers))
        method, target, _ = line.split(" ")
        if method != "CONNECT":
            answer(sock, b"from the proxy")
            return
        host, port = target.rsplit(":", 1)
        upstream = socket.create_connection(("127.0.0.1", int(port)))
        sock.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")

        def pump(a, b):
            try:
                while chunk := a.recv(65536):
                    b.sendall(chunk)
            except OSError:
                pass
            finally:
                for s in (a, b):
                    try:
                        s.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass

        back = threading.Thread(target=pump, args=(upstream, sock), daemon=True)
        back.start()
        pump(sock, upstream)
        back.join(5)


def test_https_goes_through_the_environments_proxy_with_connect(tls_server_context, monkeypatch):
    context, ca = tls_server_context
    target = https_server()(context)
    proxy = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "example.invalid")
    transport = HttpClientTransport(connection_verify=ca, connection_timeout=5, read_timeout=5)
    try:
        for _ in range(2):
            response = get(transport, f"https://localhost:{target.port}/x")
            assert response.read() == b"over tls"
        assert len(proxy.seen) == 1  # one tunnel, reused
        line, headers = proxy.seen[0]
        assert line.startswith(f"CONNECT localhost:{target.port} HTTP/1.")
        assert headers["proxy-authorization"] == "Basic " + base64.b64encode(b"user:p@ss").decode()
    finally:
        transport.close()
        target.close()
        proxy.server.close()


def test_no_proxy_and_plain_http_through_a_proxy(tls_server_context, monkeypatch):
    context, ca = tls_server_context
    target = https_server()(context)
    proxy = ConnectProxy()
    monkeypatch.setenv("HTTPS_PROXY", proxy.url)
    monkeypatch.setenv("HTTP_PROXY", proxy.url)
    monkeypatch.setenv("NO_PROXY", "localhost")
    transport = HttpClientTransport(connection_verify=ca, connection_timeout=5, read_timeout=5)
    try:
        assert get(transport, f"https://localhost:{target.port}/x").read() == b"over tls"
        assert proxy.seen == []  # NO_PROXY
        response = get(transport, "http://storage.example:8080/c/b?x=1")
        assert response.read() == b"from the proxy"
        line, headers = proxy.seen[0]
        assert line == "GET http://storage.example:8080/c/b?x=1 HTTP/1.1"
        assert "proxy-authorization" in headers
    finally:
        transport.close()
        target.close()
        proxy.server.close()


def test_a_certificate_nobody_trusts_is_refused(tls_server_context):
    context, ca = tls_server_context
    target = https_server()(context)
    default = HttpClientTransport(connection_timeout=5, read_timeout=5)  # certifi's roots
    try:
        with pytest.raises(ServiceRequestError, match="CERTIFICATE_VERIFY_FAILED"):
            get(default, f"https://localhost:{target.port}/x")
        trusting = HttpClientTransport(connection_verify=ca)
        assert get(trusting, f"https://localhost:{target.port}/x").read() == b"over tls"
        trusting.close()
    finally:
        default.close()
        target.close()
