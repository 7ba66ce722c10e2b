"""A Fluentd forward-protocol client for shipper/tests/forward.rs.

Driven by JSON commands on standard input, one per line, each answered by one JSON line on
standard output. fluent-logger (Fluentd's own Python client) sends Message mode; msgpack builds
the other modes, the chunk option and the shared-key handshake. One process is one connection.
"""

import gzip
import hashlib
import json
import socket
import ssl
import struct
import sys

import msgpack
from fluent import sender

conn = None
unpacker = None


def event_time(secs, nanos):
    return msgpack.ExtType(0, struct.pack(">II", secs, nanos))


def entry_time(e):
    secs, nanos = e[0], e[1]
    return secs if nanos is None else event_time(secs, nanos)


def read(timeout):
    """The next object from the server, "timeout", or "closed"."""
    conn.settimeout(timeout)
    while True:
        for obj in unpacker:
            return obj
        try:
            data = conn.recv(65536)
        except socket.timeout:
            return "timeout"
        except OSError:
            return "closed"
        if not data:
            return "closed"
        unpacker.feed(data)


def wait_closed(timeout):
    """Reads (and ignores: a TLS alert, say) until the server closes, within `timeout`."""
    conn.settimeout(timeout)
    try:
        while conn.recv(65536):
            pass
    except socket.timeout:
        return {"closed": False}
    except OSError:
        pass
    return {"closed": True}


def proof(salt, hostname, nonce, key):
    return hashlib.sha512(salt + hostname.encode() + nonce + key.encode()).hexdigest()


def connect(c):
    global conn, unpacker
    s = socket.create_connection(("127.0.0.1", c["port"]), timeout=10)
    if c.get("tls_ca"):
        ctx = ssl.create_default_context(cafile=c["tls_ca"])
        s = ctx.wrap_socket(s, server_hostname="localhost")
    conn = s
    unpacker = msgpack.Unpacker(raw=False)
    if "shared_key" not in c:
        return {"ok": True}
    helo = read(10)
    if not isinstance(helo, list) or helo[0] != "HELO":
        return {"ok": False, "helo": repr(helo)}
    nonce = helo[1]["nonce"]
    salt, host, key = b"salt-1234", "edge-1", c["shared_key"]
    conn.sendall(msgpack.packb(["PING", host, salt, proof(salt, host, nonce, key), "", ""]))
    pong = read(10)
    if not isinstance(pong, list):
        return {"ok": False, "pong": pong}
    _, ok, reason, server, server_proof = pong
    proven = ok and server_proof == proof(salt, server, nonce, key)
    return {"ok": ok, "reason": reason, "server": server, "proven": proven}


def message(c):
    """The bytes of one forward message in mode c["mode"]."""
    tag, entries = c["tag"], c["entries"]
    option = {}
    if c.get("chunk") is not None:
        option = {"chunk": c["chunk"], "size": len(entries)}
    pairs = [[entry_time(e), e[2]] for e in entries]
    mode = c["mode"]
    if mode == "message":
        (t, record), = pairs
        packet = [tag, t, record]
    elif mode == "forward":
        packet = [tag, pairs]
    else:
        packed = b"".join(msgpack.packb(p) for p in pairs)
        if mode == "compressed":
            packed = gzip.compress(packed)
            option["compressed"] = "gzip"
        packet = [tag, packed]
    if option:
        packet.append(option)
    return msgpack.packb(packet, use_bin_type=True)


def logger(c):
    """Message mode through fluent-logger: one emit per record, then close."""
    s = sender.FluentSender(c["tag"], host="127.0.0.1", port=c["port"], timeout=10)
    sent = []
    for e in c["entries"]:
        sent.append(s.emit_with_time(c["label"], entry_time(e), e[2]))
    s.close()
    return {"sent": sent}


def run(c):
    cmd = c["cmd"]
    if cmd == "connect":
        return connect(c)
    if cmd == "send":
        conn.sendall(message(c))
        return {"ok": True}
    if cmd == "raw":
        conn.sendall(bytes.fromhex(c["hex"]))
        return {"ok": True}
    if cmd == "ack":
        got = read(c["timeout"])
        if isinstance(got, dict):
            return {"ack": got.get("ack")}
        return {got: True}
    if cmd == "wait_closed":
        return wait_closed(c["timeout"])
    if cmd == "logger":
        return logger(c)
    raise ValueError(f"unknown command {cmd!r}")


for line in sys.stdin:
    try:
        answer = run(json.loads(line))
    except Exception as e:  # the test reads what went wrong
        answer = {"error": repr(e)}
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
