"""A stand-in for the proxy (and for apps) in the interception tests.

`dstecho.py serve PORT...` listens on every PORT (IPv4 and IPv6) and answers
each connection with one JSON line, then closes it:
`{"port": <listening port>, "orig_dst": [ip, port] | null, "peer": [ip, port], "uid": n}`,
where `orig_dst` is what SO_ORIGINAL_DST reports (the destination before an
iptables REDIRECT). `dstecho.py ask HOST PORT` connects, prints the line.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h; IP6T_SO_ORIGINAL_DST has the same value


def original_dst(conn: socket.socket) -> list[object] | None:
    try:
        if conn.family == socket.AF_INET6:
            raw = conn.getsockopt(socket.IPPROTO_IPV6, SO_ORIGINAL_DST, 28)
            port = struct.unpack_from("!H", raw, 2)[0]
            return [socket.inet_ntop(socket.AF_INET6, raw[8:24]), port]
        raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        port = struct.unpack_from("!H", raw, 2)[0]
        return [socket.inet_ntoa(raw[4:8]), port]
    except OSError:
        return None


def serve(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for port in ports:
        for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((host, port))
            except OSError:
                if family == socket.AF_INET6:
                    continue  # no IPv6 in this namespace
                raise
            sock.listen(64)
            sel.register(sock, selectors.EVENT_READ, port)
    print("ready", flush=True)
    while True:
        for key, _ in sel.select():
            listener = key.fileobj
            assert isinstance(listener, socket.socket)
            conn, peer = listener.accept()
            with conn:
                reply = {
                    "port": key.data,
                    "orig_dst": original_dst(conn),
                    "peer": list(peer[:2]),
                    "uid": os.getuid(),
                }
                with contextlib.suppress(OSError):
                    conn.sendall(json.dumps(reply).encode() + b"\n")


def ask(host: str, port: int) -> None:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect((host, port))
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            if not chunk:
                break
            data += chunk
    sys.stdout.write(data.decode())


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve([int(p) for p in sys.argv[2:]])
    elif sys.argv[1] == "ask":
        ask(sys.argv[2], int(sys.argv[3]))
    else:
        raise SystemExit("usage: dstecho.py serve PORT... | ask HOST PORT")
