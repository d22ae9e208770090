"""A hostile guest agent on a real unix socket, in a process of its own: ``python -m tests.fakeagent SOCKET MODE``.

It answers ``guest-sync`` as qemu-ga does (so the server's client synchronises) and ``guest-ping`` with
``{}``; every other command gets what ``MODE`` forges (a fault a real agent cannot be made to produce):

* ``elements``: ``{"return":[{},{},...]}``, just under 32 MiB on one line (the issue's 739 MiB parse);
* ``long-line``: a 40 MiB line without a newline until its end (a string that never ends);
* ``many-numbers``: ``{"return":[0,0,...]}`` of 600 KiB: short, but 300,000 elements;
* ``big-output``: ``guest-exec-status`` with 3 MiB of stdout, as qemu-ga sends a chatty command's output;
* ``junk-first``: half a line of junk before the answer to ``guest-sync``, then ordinary answers.

Its own process, so that the test's memory figures are the client's alone.  It serves connection after
connection until killed.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import sys

CHUNK = 64 << 10


def forged(mode: str, command: str) -> bytes:
    if mode == "elements":
        count = (32 << 20) // 3 - 10
        return b'{"return":[' + b"{}," * count + b"{}]}\n"
    if mode == "long-line":
        return b'{"return":"' + b"x" * (40 << 20) + b'"}\n'
    if mode == "many-numbers":
        return b'{"return":[' + b"0," * 300_000 + b"0]}\n"
    if mode == "big-output" and command == "guest-exec-status":
        out = base64.b64encode(b"y" * (3 << 20)).decode()
        return json.dumps({"return": {"exited": True, "exitcode": 0, "out-data": out}}).encode() + b"\n"
    return b'{"return":{"version":"forged"}}\n'


def serve(path: str, mode: str) -> None:
    if os.path.exists(path):
        os.unlink(path)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    while True:
        conn, _ = server.accept()
        with conn, conn.makefile("rb") as lines:
            try:
                for line in lines:
                    request = json.loads(line)
                    command = request.get("execute")
                    if command == "guest-sync":
                        if mode == "junk-first":
                            conn.sendall(b'{"return": [1, 2, 3')  # what an earlier client left half read
                            conn.sendall(b"\n")
                        reply = json.dumps({"return": request["arguments"]["id"]}).encode() + b"\n"
                    elif command == "guest-ping":
                        reply = b'{"return":{}}\n'
                    else:
                        reply = forged(mode, command)
                    for start in range(0, len(reply), CHUNK):
                        conn.sendall(reply[start : start + CHUNK])
            except OSError:
                continue  # the client hung up mid-answer (it refused it): wait for the next one


if __name__ == "__main__":
    serve(sys.argv[1], sys.argv[2])
