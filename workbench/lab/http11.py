"""A small keep-alive HTTP/1.1 client for streaming POSTs over plain http, on asyncio streams.

The lab's URL target sends thousands of streaming requests a second to
servers on loopback or a local network; httpx costs a few milliseconds of CPU
per request there (its connection pool, anyio and h11 layers), which would make
the generator the bottleneck of the measurement. This client does only what
that needs: POST a JSON body, read the status and headers, then the body
(chunked, by Content-Length, or to the close) as lines, and keep the
connection for the next request when the body was read to its end. Anything
else (https, proxies, redirects) is left to httpx.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import AsyncIterator
from urllib.parse import urlsplit

MAX_LINE = 1 << 20  # a header or SSE line longer than this is a protocol error


class HTTPError(ConnectionError):
    """The server broke the protocol or closed the connection early."""


@dataclass(slots=True)
class Response:
    status: int
    headers: dict[str, str]
    _reader: asyncio.StreamReader
    _done: bool = False
    _chunked: bool = False
    _left: int | None = None  # bytes of a Content-Length body still to read
    _buffer: bytearray = field(default_factory=bytearray)

    async def _next_piece(self) -> bytes:
        """The next piece of the body (b"" at its end)."""
        r = self._reader
        if self._done:
            return b""
        if self._chunked:
            size_line = await r.readuntil(b"\r\n")
            size = int(size_line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await r.readuntil(b"\r\n")) != b"\r\n":  # trailers, then the blank line
                    pass
                self._done = True
                return b""
            data = await r.readexactly(size + 2)
            return data[:-2]
        if self._left is not None:
            if self._left == 0:
                self._done = True
                return b""
            data = await r.read(min(self._left, 65536))
            if not data:
                raise HTTPError("the server closed the connection inside the body")
            self._left -= len(data)
            return data
        data = await r.read(65536)
        if not data:
            self._done = True
        return data

    async def lines(self) -> AsyncIterator[str]:
        """The body's lines (without line ends), as they arrive."""
        buf = self._buffer
        while True:
            piece = await self._next_piece()
            if not piece:
                if buf:
                    yield buf.decode(errors="replace")
                    buf.clear()
                return
            buf += piece
            if len(buf) > MAX_LINE and b"\n" not in buf:
                raise HTTPError("a line of the body is too long")
            *complete, rest = bytes(buf).split(b"\n")
            buf[:] = rest
            for line in complete:
                yield line.rstrip(b"\r").decode(errors="replace")

    async def read(self) -> bytes:
        out = bytearray()
        while piece := await self._next_piece():
            out += piece
        return bytes(out)

    @property
    def reusable(self) -> bool:
        return self._done and self.headers.get("connection", "").lower() != "close"


class Client:
    """Keep-alive connections to one `http://host:port`, at most `max_connections` open at once."""

    def __init__(self, base_url: str, headers: dict[str, str] | None = None, max_connections: int = 1024,
                 connect_timeout_s: float = 10.0) -> None:
        parts = urlsplit(base_url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"base_url must be http://host[:port], got {base_url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self.prefix = parts.path.rstrip("/")
        host_header = parts.netloc
        extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self._head = f"Host: {host_header}\r\nAccept: */*\r\n{extra}"
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._slots = asyncio.Semaphore(max_connections)
        self.connect_timeout_s = connect_timeout_s

    async def _connection(self, fresh: bool = False) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bool]:
        """(reader, writer, reused): a kept-alive connection if one is idle (unless `fresh`), else a new one."""
        while self._idle and not fresh:
            reader, writer = self._idle.pop()
            if not writer.is_closing() and not reader.at_eof():
                return reader, writer, True
            writer.close()
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port, limit=MAX_LINE),
                                                self.connect_timeout_s)
        return reader, writer, False

    def request(self, method: str, path: str, body: bytes = b"", content_type: str = "application/json") -> "_Exchange":
        """An async context manager yielding the `Response`; the connection is reused if the body was read."""
        return _Exchange(self, method, path, body, content_type)

    async def aclose(self) -> None:
        for _, writer in self._idle:
            writer.close()
        self._idle.clear()


class _Exchange:
    def __init__(self, client: Client, method: str, path: str, body: bytes, content_type: str) -> None:
        self.client, self.method, self.path, self.body, self.content_type = client, method, path, body, content_type
        self.conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self.response: Response | None = None

    async def __aenter__(self) -> Response:
        c = self.client
        await c._slots.acquire()
        try:
            reader, writer, reused = await c._connection()
            self.conn = reader, writer
            head = (f"{self.method} {c.prefix}{self.path} HTTP/1.1\r\n{c._head}"
                    f"Content-Type: {self.content_type}\r\nContent-Length: {len(self.body)}\r\n\r\n").encode()
            writer.write(head + self.body)
            try:
                status_line = await reader.readuntil(b"\r\n")
            except (asyncio.IncompleteReadError, ConnectionError):
                if not reused:
                    raise
                # the server closed this idle connection as we reused it (its keep-alive timeout): nothing
                # of the request was answered, so it goes once more on a new connection
                writer.close()
                reader, writer, _ = await c._connection(fresh=True)
                self.conn = reader, writer
                writer.write(head + self.body)
                status_line = await reader.readuntil(b"\r\n")
            parts = status_line.split(None, 2)
            if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
                raise HTTPError(f"not an HTTP/1.1 response: {status_line[:80]!r}")
            headers: dict[str, str] = {}
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                key, _, value = line.decode("latin-1").partition(":")
                headers[key.strip().lower()] = value.strip()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError, HTTPError) as exc:
            self._drop()
            raise HTTPError(f"{type(exc).__name__}: {exc}") from None
        except BaseException:
            self._drop()
            raise
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self.response = Response(int(parts[1]), headers, reader, _chunked=chunked,
                                 _left=int(length) if length is not None and not chunked else None)
        return self.response

    async def __aexit__(self, exc_type: object, *exc: object) -> None:
        if exc_type is None and self.response is not None and self.response.reusable and self.conn is not None:
            self.client._idle.append(self.conn)
            self.conn = None
            self.client._slots.release()
        else:
            self._drop()

    def _drop(self) -> None:
        if self.conn is not None:
            self.conn[1].close()
            self.conn = None
            self.client._slots.release()
