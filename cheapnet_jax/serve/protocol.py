"""The service's HTTP/1.1 connections: uvicorn's httptools protocol with a bound on a request's
head (its request line and headers).

httptools sets no such bound: it gathers a header's value whole before handing it over, so a
client could send a header of 100 MiB and the process would hold it (it grew by about 300 MiB,
and the request was answered 200). Here a head larger than `MAX_HEAD_BYTES` is answered 431
with the service's JSON error and the connection is closed (after the client has had time to
read the answer), before the application sees the
request, on every path (the line's fast path included). The bytes held for a head stay within
the bound plus one read from the socket.
"""

from __future__ import annotations

import json

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

MAX_HEAD_BYTES = 64 * 1024
"""The largest request head (request line and headers) answered; nginx's default large header
buffers are 4 x 8 KiB, Node's 16 KiB."""


LINGER_S = 2.0
"""How long a refused connection's further bytes are read and dropped before it is closed."""


class BoundedHeadProtocol(HttpToolsProtocol):
    """`HttpToolsProtocol` refusing a request whose head exceeds ``max_head_bytes`` (431)."""

    max_head_bytes = MAX_HEAD_BYTES

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._reading_head = True  # a connection starts with a request's head
        self._head_bytes = 0  # bytes of the head read so far (whole reads inside the head)
        self._refused = False

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        inside_head = self._reading_head
        super().data_received(data)
        # A read that began and ended inside the head is head bytes only: count it; the read
        # that completes the head is measured exactly in `on_headers_complete`.
        if inside_head and self._reading_head and not self._refused:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes:
                self._refuse(f"more than {self._head_bytes:,} bytes of request headers so far")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._reading_head, self._head_bytes = True, 0

    def on_headers_complete(self) -> None:
        self._reading_head = False
        size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
        if size > self.max_head_bytes:
            self._refuse(f"{size:,} bytes of request headers")
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if not self._refused:
            super().on_message_complete()

    def _refuse(self, what: str) -> None:
        """Answer 431 with the service's JSON error and close the connection."""
        self._refused = True
        body = json.dumps(
            {"error": f"{what}, more than the {self.max_head_bytes:,} allowed"}
        ).encode()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        # Closing a socket with unread bytes makes the kernel reset the connection, and the
        # client may lose the answer with it: say no more (EOF), discard what still comes
        # (`data_received`), and close a moment later.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_S, self.transport.close)
