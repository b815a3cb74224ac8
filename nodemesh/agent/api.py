"""The agent's local API: HTTP/1.1 with JSON over a root-only unix socket.

Small on purpose: a route table of async handlers that return JSON-able data, or an async
iterator of JSON-able items for streams (sent as JSON lines, chunked, until the client goes).
`nodemesh.cluster.agentclient.AgentClient` is the other side (the CLI's, the daemon's).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import logging
import os
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

log = logging.getLogger("nodemesh.api")
Handler = Callable[[dict[str, list[str]], bytes], Awaitable[Any]]


class ApiError(Exception):
    """An answer other than 200: {"error": message, **extra} (extra: e.g. the CNI error code)."""

    def __init__(self, status: int, message: str, **extra: Any) -> None:
        super().__init__(message)
        self.status = status
        self.extra = extra


class ApiServer:
    def __init__(self, path: str) -> None:
        self.path = path
        self.routes: dict[tuple[str, str], Handler] = {}
        self._server: asyncio.AbstractServer | None = None

    def route(self, method: str, path: str, fn: Handler) -> None:
        self.routes[(method, path)] = fn

    async def start(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        old = os.umask(0o177)  # root-only: the socket is created 0600
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    def close(self) -> None:
        if self._server:
            self._server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = (await reader.readline()).decode("latin-1").strip()
            if not line:
                return
            method, target, _ = line.split(" ", 2)
            headers = {}
            while True:
                h = (await reader.readline()).decode("latin-1").strip()
                if not h:
                    break
                k, _, v = h.partition(":")
                headers[k.strip().lower()] = v.strip()
            body = b""
            if n := int(headers.get("content-length", "0")):
                body = await reader.readexactly(n)
            url = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(url.query, keep_blank_values=True)
            fn = self.routes.get((method, url.path))
            if fn is None:
                await self._send(writer, 404, {"error": f"no such endpoint: {method} {url.path}"})
                return
            try:
                result = await fn(query, body)
            except ApiError as e:
                await self._send(writer, e.status, {"error": str(e), **e.extra})
                return
            except Exception as e:
                log.exception("api %s %s", method, url.path)
                await self._send(writer, 500, {"error": f"{type(e).__name__}: {e}"})
                return
            if hasattr(result, "__aiter__"):
                await self._stream(writer, result)
            else:
                await self._send(writer, 200, result)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def _send(self, writer: asyncio.StreamWriter, status: int, data: Any) -> None:
        body = json.dumps(data).encode()
        writer.write(f"HTTP/1.1 {status} {http.client.responses.get(status, '')}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\n\r\n".encode() + body)
        await writer.drain()

    async def _stream(self, writer: asyncio.StreamWriter, items: AsyncIterator[Any]) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n"
                     b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
        try:
            async for item in items:
                chunk = (json.dumps(item) + "\n").encode()
                writer.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                await writer.drain()
            writer.write(b"0\r\n\r\n")
            await writer.drain()
        finally:
            with contextlib.suppress(Exception):
                await items.aclose()  # type: ignore[attr-defined]
