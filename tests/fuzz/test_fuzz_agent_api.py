"""Fuzz the agent's local API server with raw request bytes on a unix socket.

Every reply is a well-formed HTTP response with a status below 500, or the connection is closed
with no reply; the server keeps serving afterwards. The routes are a representative subset of
the agent's (`nodemesh/agent/main.py`): a query-reading GET and a JSON-body POST that refuse bad
input with ApiError(400), as the agent's handlers do.
"""

from __future__ import annotations

import asyncio
import json
import os
import tempfile

from hypothesis import event, given
from hypothesis import strategies as st

from nodemesh.agent.api import ApiError, ApiServer


async def _status(query: dict[str, list[str]], body: bytes) -> dict:
    return {"node": "n1", "query": query}


async def _post(query: dict[str, list[str]], body: bytes) -> dict:
    try:
        data = json.loads(body or b"{}")
    except ValueError as e:
        raise ApiError(400, f"body: not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "body: must be a JSON object")
    return {"ok": True}


methods = st.sampled_from(["GET", "POST", "PUT", "get", "", "G\x00T", "DELETE"])
targets = st.one_of(st.sampled_from(["/status", "/certificates", "/flows?since=0", "/", "*",
                                     "/status?%zz=%%&a", "//x", "/certificates?x=" + "a" * 5000]),
                    st.text(max_size=40))
headers = st.lists(st.one_of(st.sampled_from(["Content-Length: 5", "Content-Length: -3",
                                              "Content-Length: x", "Content-Length: 0", "Host: a",
                                              ":", "Content-Length: 999999999999999999999"]),
                             st.text(max_size=30)), max_size=4)
requests = st.one_of(
    st.builds(lambda m, t, h, b: (f"{m} {t} HTTP/1.1\r\n" + "".join(x + "\r\n" for x in h)
                                  + "\r\n").encode("utf-8", "surrogateescape") + b,
              methods, targets, headers, st.binary(max_size=64)),
    st.binary(max_size=300),
)

_LOOP = asyncio.new_event_loop()
_SOCK = os.path.join(tempfile.mkdtemp(prefix="nodemesh-fuzz-api-"), "agent.sock")
_SERVER = ApiServer(_SOCK)
for _m, _p, _fn in (("GET", "/status", _status), ("GET", "/certificates", _status),
                    ("POST", "/certificates", _post)):
    _SERVER.route(_m, _p, _fn)
_LOOP.run_until_complete(_SERVER.start())


async def _roundtrip(raw: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(_SOCK)
    writer.write(raw)
    await writer.drain()
    writer.write_eof()  # a request that claims more body than it sends ends here
    try:
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


@given(requests)
def test_api_any_request(raw: bytes) -> None:
    reply = _LOOP.run_until_complete(_roundtrip(raw))
    if reply:
        head, sep, _ = reply.partition(b"\r\n\r\n")
        assert sep, reply
        status_line = head.split(b"\r\n", 1)[0].split(b" ")
        assert status_line[0] == b"HTTP/1.1", reply
        assert int(status_line[1]) < 500, reply
        event(f"status {int(status_line[1])}")
    else:
        event("closed")
    ok = _LOOP.run_until_complete(_roundtrip(b"GET /status HTTP/1.1\r\n\r\n"))
    assert ok.startswith(b"HTTP/1.1 200 "), "server stopped serving"
