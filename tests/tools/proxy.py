"""A small TCP proxy between two agents that can flip one byte of page payload.

    proxy = FlipProxy(("127.0.0.1", b_port), flip_after_bytes=8 * 2**20, min_page=1024)
    proxy.start()          # proxy.addr is "127.0.0.1:PORT": give it to the source as the destination
    ...
    proxy.close()

Source -> destination bytes are parsed as livemig frames (16-byte prefix
``!4sHHII``: magic, type, flags, body length, payload length; msgpack body;
raw payload for PageBatch); the other direction is copied as is. Once
``flip_after_bytes`` bytes of PageBatch payload have gone through (over all
connections), the proxy XORs one byte (0xFF) in the first following payload
page whose page number is at least ``min_page``, once in its lifetime, and
records ``(page, byte offset in page)`` in ``flipped``. With
``flip_after_bytes=None`` it is a plain, transparent relay (the control).
A data stream (it starts with the 8-byte DATA_STREAM_MAGIC, protocol v3)
has the magic relayed and is then parsed the same way. A stream that does
not start with the livemig magic is relayed unparsed.

``reset_data_stream_after=N`` kills the first data stream that has relayed
N bytes of page payload: both of its sockets are closed with a TCP reset
(SO_LINGER 0), the way a dead link or a middlebox would end it; ``reset``
then names the stream's connection number. It may be set while the proxy
runs (0: the next frame of any data stream is not relayed, it is reset).
"""
from __future__ import annotations

import socket
import struct
import threading

import msgpack

PREFIX = struct.Struct("!4sHHII")
MAGIC = b"LMIG"
DATA_MAGIC = b"LMDATA3\n"
PAGE = 4096
FLIP_OFFSET_IN_PAGE = 1234


def _page_batch_type() -> int:
    try:
        from protocol.wire import MsgType
        return int(MsgType.PAGE_BATCH)
    except Exception:  # pragma: no cover - the protocol package is part of the tree
        return 7


def _runs(body: dict) -> list[tuple[int, int]]:
    runs = body.get("runs") or []
    if runs and isinstance(runs[0], (list, tuple)):
        return [(int(f), int(c)) for f, c in runs]
    return [(int(runs[i]), int(runs[i + 1])) for i in range(0, len(runs) - 1, 2)]


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """n bytes, or None at EOF (a partial read at EOF is returned as is)."""
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return bytes(buf) if buf else None
        buf += chunk
    return bytes(buf)


class FlipProxy:
    def __init__(self, target: tuple[str, int], flip_after_bytes: int | None = None, min_page: int = 0,
                 reset_data_stream_after: int | None = None) -> None:
        self.target = target
        self.reset_data_stream_after = reset_data_stream_after
        self.reset: int | None = None           # connection number of the stream that was reset
        self.data_streams = 0
        self.flip_after_bytes = flip_after_bytes
        self.min_page = min_page
        self.page_batch_type = _page_batch_type()
        self.payload_bytes = 0                  # PageBatch payload relayed, all connections
        self.flipped: list[tuple[int, int]] = []
        self.connections = 0
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._lsock.bind(("127.0.0.1", 0))
        self._lsock.listen(16)
        self.addr = f"127.0.0.1:{self._lsock.getsockname()[1]}"

    # ---- lifecycle -----------------------------------------------------------
    def start(self) -> "FlipProxy":
        self._spawn(self._accept_loop)
        return self

    def close(self) -> None:
        self._closed = True
        try:
            self._lsock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._lsock.close()
        with self._lock:
            socks = list(self._socks)
        for s in socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> "FlipProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def _spawn(self, fn, *args) -> None:
        t = threading.Thread(target=fn, args=args, daemon=True)
        self._threads.append(t)
        t.start()

    def _track(self, s: socket.socket) -> None:
        with self._lock:
            self._socks.add(s)

    # ---- relaying ------------------------------------------------------------
    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._lsock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
                upstream.settimeout(None)
            except OSError:
                client.close()
                continue
            self.connections += 1
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._track(s)
            self._spawn(self._pump_frames, client, upstream, self.connections)
            self._spawn(self._pump_raw, upstream, client)

    @staticmethod
    def _half_close(src: socket.socket, dst: socket.socket, failed: bool) -> None:
        """EOF from src: pass it on (FIN). An error: end both ways (the other pump wakes up)."""
        ends = [(dst, socket.SHUT_RDWR), (src, socket.SHUT_RDWR)] if failed else [(dst, socket.SHUT_WR)]
        for s, how in ends:
            try:
                s.shutdown(how)
            except OSError:
                pass

    def _pump_raw(self, src: socket.socket, dst: socket.socket) -> None:
        failed = False
        try:
            while True:
                data = src.recv(1 << 20)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            failed = True
        self._half_close(src, dst, failed)

    def _reset_now(self, data_stream: bool, relayed: int, conn_no: int) -> bool:
        if self.reset_data_stream_after is None or not data_stream or relayed < self.reset_data_stream_after:
            return False
        with self._lock:
            if self.reset is None:
                self.reset = conn_no
            return self.reset == conn_no

    @staticmethod
    def _rst(*socks: socket.socket) -> None:
        for s in socks:
            try:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _pump_frames(self, src: socket.socket, dst: socket.socket, conn_no: int = 0) -> None:
        failed = False
        data_stream = False
        relayed = 0
        try:
            head = _recv_exact(src, len(DATA_MAGIC))
            if head is None:
                self._half_close(src, dst, False)
                return
            if head == DATA_MAGIC:
                data_stream = True
                with self._lock:
                    self.data_streams += 1
                dst.sendall(head)
                pending = b""
            else:
                pending = head
            while True:
                if self._reset_now(data_stream, relayed, conn_no):
                    self._rst(src, dst)
                    return
                more = _recv_exact(src, PREFIX.size - len(pending)) if len(pending) < PREFIX.size else b""
                prefix = pending + (more or b"") if (more is not None or pending) else None
                pending = b""
                if not prefix:
                    break
                if self._reset_now(data_stream, relayed, conn_no):   # before relaying this frame
                    self._rst(src, dst)
                    return
                if len(prefix) < PREFIX.size or prefix[:4] != MAGIC:
                    dst.sendall(prefix)           # not livemig (or TLS): relay the rest unparsed
                    relayed += len(prefix)
                    while data := src.recv(1 << 20):
                        dst.sendall(data)
                        relayed += len(data)      # TLS: the reset counts ciphertext bytes
                        if self._reset_now(data_stream, relayed, conn_no):
                            self._rst(src, dst)
                            return
                    break
                _, mtype, _, body_len, payload_len = PREFIX.unpack(prefix)
                body = _recv_exact(src, body_len) if body_len else b""
                if body is None or len(body) < body_len:
                    dst.sendall(prefix + (body or b""))
                    break
                payload = _recv_exact(src, payload_len) if payload_len else b""
                if payload is None or len(payload) < payload_len:
                    dst.sendall(prefix + body + (payload or b""))
                    break
                if mtype == self.page_batch_type and payload_len:
                    payload = self._maybe_flip(body, payload)
                    relayed += payload_len
                dst.sendall(prefix + body + payload)
        except OSError:
            failed = True
        self._half_close(src, dst, failed)

    def _maybe_flip(self, body: bytes, payload: bytes) -> bytes:
        with self._lock:
            start = self.payload_bytes
            self.payload_bytes += len(payload)
            if self.flip_after_bytes is None or self.flipped or self.payload_bytes <= self.flip_after_bytes:
                return payload
            try:
                runs = _runs(msgpack.unpackb(body, raw=False, strict_map_key=False))
            except Exception:
                return payload
            pos = 0
            for first, count in runs:
                for page in range(first, first + count):
                    if start + pos + PAGE > self.flip_after_bytes and page >= self.min_page and pos + PAGE <= len(payload):
                        buf = bytearray(payload)
                        buf[pos + FLIP_OFFSET_IN_PAGE] ^= 0xFF
                        self.flipped.append((page, FLIP_OFFSET_IN_PAGE))
                        return bytes(buf)
                    pos += PAGE
            return payload
