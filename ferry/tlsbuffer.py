"""OpenSSL's buffering BIO under a TLS socket: records leave and arrive in large reads and writes;
and OpenSSL's keying-material exporter, which ``ferry.records`` keys its records with.

Python's ``ssl`` gives each TLS record its own system call: a 16 KiB record is
one ``write`` at the sender, a 5-byte header and a body two ``read`` calls at
the receiver, each waking the peer. OpenSSL has the remedy built in (its
``BIO_f_buffer``, which it uses itself for handshake flights); Python does not
expose it, so this module puts one between an ``SSLSocket``'s ``SSL`` and its
socket BIO through ``ctypes``. The sender then gathers a frame's records and
writes them in one call per buffer (``flush`` at the end of a frame); the
receiver reads the socket a buffer at a time and OpenSSL takes its records
from memory.

Reaching the ``SSL`` needs the interpreter's ``_ssl._SSLSocket`` layout
(``PyObject_HEAD``, a weak reference to the socket, the ``SSL *``); the weak
reference is checked to be the socket's own before the next field is trusted,
and the socket's descriptor against ``SSL_get_fd``. Where any of it does not
hold (another interpreter, OpenSSL linked statically) the socket is left as it
was: every record its own system call, as before, and nothing else changes.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import ssl
import threading
import weakref
from typing import Any

log = logging.getLogger(__name__)

_BIO_C_SET_BUFF_SIZE = 117
_BIO_CTRL_PENDING = 10
_BIO_CTRL_FLUSH = 11

_PTR = ctypes.sizeof(ctypes.c_void_p)
_SOCKET_FIELD = 2 * _PTR  # after PyObject_HEAD (reference count, type)
_SSL_FIELD = 3 * _PTR


class _Lib:
    """The functions of the libssl and libcrypto that Python's ``_ssl`` itself uses."""

    def __init__(self) -> None:
        # dlsym on _ssl's own handle searches the libraries it was linked with,
        # so these are the very libssl and libcrypto behind ``ssl``.
        lib = ctypes.CDLL(ssl._ssl.__file__, use_errno=True)  # type: ignore[attr-defined]
        vp, ci, cl = ctypes.c_void_p, ctypes.c_int, ctypes.c_long
        self.get_fd = self._fn(lib.SSL_get_fd, ci, vp)
        self.get_rbio = self._fn(lib.SSL_get_rbio, vp, vp)
        self.get_wbio = self._fn(lib.SSL_get_wbio, vp, vp)
        self.set0_rbio = self._fn(lib.SSL_set0_rbio, None, vp, vp)
        self.set0_wbio = self._fn(lib.SSL_set0_wbio, None, vp, vp)
        self.f_buffer = self._fn(lib.BIO_f_buffer, vp)
        self.new = self._fn(lib.BIO_new, vp, vp)
        self.free = self._fn(lib.BIO_free, ci, vp)
        self.push = self._fn(lib.BIO_push, vp, vp, vp)
        self.up_ref = self._fn(lib.BIO_up_ref, ci, vp)
        self.int_ctrl = self._fn(lib.BIO_int_ctrl, cl, vp, ci, cl, ci)
        self.ctrl = self._fn(lib.BIO_ctrl, cl, vp, ci, cl, vp)
        sz, cp = ctypes.c_size_t, ctypes.c_char_p
        self.export = self._fn(lib.SSL_export_keying_material, ci, vp, cp, sz, cp, sz, cp, sz, ci)

    @staticmethod
    def _fn(fn: Any, restype: Any, *argtypes: Any) -> Any:
        fn.restype = restype
        fn.argtypes = list(argtypes)
        return fn


_lib: _Lib | None = None
_lib_failed = False
_lock = threading.Lock()


def _load() -> _Lib | None:
    global _lib, _lib_failed
    with _lock:
        if _lib is None and not _lib_failed:
            try:
                _lib = _Lib()
            except (OSError, AttributeError) as exc:
                _lib_failed = True
                log.debug("TLS records unbuffered: %s", exc)
        return _lib


def _ssl_of(lib: _Lib, sock: ssl.SSLSocket, obj: Any) -> int | None:
    """The ``SSL *`` of ``obj``, ``sock``'s ``_ssl._SSLSocket``, or None where the layout is
    not the one known."""
    if type(obj).__name__ != "_SSLSocket":  # an SSLObject's, or another interpreter's
        return None
    owner = ctypes.c_void_p.from_address(id(obj) + _SOCKET_FIELD).value
    if owner not in {id(ref) for ref in weakref.getweakrefs(sock)}:
        return None
    ptr = ctypes.c_void_p.from_address(id(obj) + _SSL_FIELD).value
    if not ptr or lib.get_fd(ptr) != sock.fileno():
        return None
    return ptr


class _Buffers:
    """What was inserted under one socket's ``SSL``; holds the ``_ssl._SSLSocket`` so that
    the ``SSL`` stays alive for as long as this entry (``SSLSocket.shutdown`` lets go of it)."""

    def __init__(self, obj: Any, ssl_ptr: int) -> None:
        self.obj = obj
        self.ssl = ssl_ptr
        self.write = False
        self.read = False


_buffers: weakref.WeakKeyDictionary[ssl.SSLSocket, _Buffers] = weakref.WeakKeyDictionary()


def _insert(lib: _Lib, ssl_ptr: int, size: int, write: bool) -> bool:
    under = lib.get_wbio(ssl_ptr) if write else lib.get_rbio(ssl_ptr)
    if not under:
        return False
    buf = lib.new(lib.f_buffer())
    if not buf:
        return False
    # 1: the write side's buffer, 0: the read side's.
    if lib.int_ctrl(buf, _BIO_C_SET_BUFF_SIZE, size, 1 if write else 0) != 1:
        lib.free(buf)
        return False
    lib.up_ref(under)  # the chain's reference; SSL_set0_* lets go of the SSL's own
    lib.push(buf, under)
    (lib.set0_wbio if write else lib.set0_rbio)(ssl_ptr, buf)
    return True


def buffer(sock: ssl.SSLSocket, *, write: int = 0, read: int = 0) -> bool:
    """Give ``sock`` a write buffer of ``write`` bytes and/or a read buffer of ``read``.

    Call once, after the handshake, before any other thread uses ``sock``. With
    a write buffer, a sender must call ``flush(sock)`` when a frame is whole
    (``ferry.wire.send`` does). False, and ``sock`` unchanged, where it cannot be done.
    """
    lib = _load()
    obj = getattr(sock, "_sslobj", None)
    ptr = _ssl_of(lib, sock, obj) if lib is not None and obj is not None else None
    if lib is None or ptr is None:
        log.debug("TLS records of %s left unbuffered: ssl's layout not recognised", sock)
        return False
    done = _Buffers(obj, ptr)
    if write:
        done.write = _insert(lib, ptr, write, write=True)
    if read:
        done.read = _insert(lib, ptr, read, write=False)
    if done.write or done.read:
        _buffers[sock] = done
    return done.write or done.read


def _held(sock: Any, write: bool) -> _Buffers | None:
    try:
        held = _buffers.get(sock)
    except TypeError:  # not a socket (nothing weakly referable was ever buffered)
        return None
    if held is None or not (held.write if write else held.read):
        return None
    # Shut down or closed: its descriptor's number may be another socket's by now.
    if getattr(sock, "_sslobj", None) is not held.obj or sock.fileno() < 0:
        raise OSError(errno.EBADF, "TLS connection closed")
    return held


def flush(sock: Any) -> None:
    """Write what ``sock``'s write buffer holds (nothing to do without one)."""
    held = _held(sock, write=True)
    if held is None or _lib is None:
        return
    wbio = _lib.get_wbio(held.ssl)
    if _lib.ctrl(wbio, _BIO_CTRL_FLUSH, 0, None) <= 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err) if err else "TLS write buffer not flushed")


def export_keying_material(sock: ssl.SSLSocket, label: bytes, length: int) -> bytes | None:
    """``length`` bytes exported from ``sock``'s TLS session under ``label`` and no context
    (RFC 5705, RFC 8446 section 7.5: both ends get the same bytes, no one else can);
    None where the ``SSL`` cannot be reached (then nothing is exported, by either end)."""
    lib = _load()
    obj = getattr(sock, "_sslobj", None)
    ptr = _ssl_of(lib, sock, obj) if lib is not None and obj is not None else None
    if lib is None or ptr is None:
        return None
    out = ctypes.create_string_buffer(length)
    if lib.export(ptr, out, length, label, len(label), None, 0, 0) != 1:
        return None
    return out.raw


def pending(sock: Any) -> int:
    """Bytes ``sock``'s read buffer holds, received but not yet taken by OpenSSL."""
    held = _held(sock, write=False)
    if held is None or _lib is None:
        return 0
    return int(_lib.ctrl(_lib.get_rbio(held.ssl), _BIO_CTRL_PENDING, 0, None))
