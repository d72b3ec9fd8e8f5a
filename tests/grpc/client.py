#!/usr/bin/env python3
"""A Clastor gRPC client in another language, made from the .proto alone.

Generates its stubs from proto/clastor/v1/lock.proto with grpcio-tools
(Debian's python3-grpc-tools) into a temporary directory, then either

  check ADDR        exercises the Session stream and the unary calls and
                    prints "ok" (any failure raises), or
  secured ADDR CA CERT KEY TOKEN
                    against a server with TLS, a client CA and an auth file
                    (tests/grpc_process.rs's): TLS with ALPN h2 as grpcio
                    needs it, the certificate CERT/KEY (CN "nobody", which
                    names no principal), bearer-token metadata, and the
                    refusals (no token, a wrong one, no certificate, a lock
                    the principal may not take); prints "ok", or
  hammer ADDR NAME  contends for tx/hammered on a Session stream until its
                    standard input closes, printing one line per grant:
                    "belief NAME TOKEN FROM_NS UNTIL_NS" (wall-clock
                    nanoseconds: from the grant's arrival until it stopped
                    trusting the lock: before sending its release, or when
                    its safe-until ran out first).

Used by tests/grpc_process.rs.
"""

import atexit
import os
import queue
import shutil
import sys
import tempfile
import threading
import time

import grpc
from grpc_tools import protoc

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(HERE, "..", "..", "proto")


def generate():
    out = tempfile.mkdtemp(prefix="clastor-grpc-py-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    rc = protoc.main([
        "grpc_tools.protoc",
        "-I" + PROTO_ROOT,
        "--python_out=" + out,
        "--grpc_python_out=" + out,
        "clastor/v1/lock.proto",
    ])
    if rc != 0:
        raise SystemExit("grpc_tools.protoc failed: %d" % rc)
    for d in ("clastor", os.path.join("clastor", "v1")):
        open(os.path.join(out, d, "__init__.py"), "a").close()
    sys.path.insert(0, out)
    from clastor.v1 import lock_pb2, lock_pb2_grpc
    return lock_pb2, lock_pb2_grpc


pb, rpc = generate()


class Stream:
    """One Session stream: requests from a queue, events read by a thread."""

    def __init__(self, stub):
        self.requests = queue.Queue()
        self.events = queue.Queue()
        self.call = stub.Session(iter(self.requests.get, None))
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()
        first = self.next()
        assert first.WhichOneof("event") == "opened", first
        self.session_id = first.opened.session_id
        self.confirm_ms = first.opened.confirm_ms

    def _read(self):
        try:
            for ev in self.call:
                self.events.put(ev)
        except grpc.RpcError as e:
            self.events.put(e)
        self.events.put(None)

    def send(self, request_id, **op):
        self.requests.put(pb.SessionRequest(request_id=request_id, **op))

    def next(self, timeout=10):
        ev = self.events.get(timeout=timeout)
        if isinstance(ev, Exception):
            raise ev
        return ev

    def answer(self, request_id, timeout=10):
        """The answer to request_id; events (lost) before it are returned too."""
        seen = []
        while True:
            ev = self.next(timeout)
            if ev is None:
                raise RuntimeError("stream ended")
            if ev.request_id == request_id and ev.WhichOneof("event") != "lost":
                return ev, seen
            seen.append(ev)

    def close(self):
        self.requests.put(None)


def check(addr):
    channel = grpc.insecure_channel(addr)
    stub = rpc.LocksStub(channel)

    # The stream is an owner.
    a = Stream(stub)
    b = Stream(stub)
    a.send(1, acquire=pb.AcquireRequest(kind="py", id="one", wait_ms=0))
    ev, _ = a.answer(1)
    assert ev.acquired.granted and ev.acquired.token > 0, ev
    assert 0 < ev.acquired.safe_ms < 4294967295, ev
    token = ev.acquired.token
    b.send(1, acquire=pb.AcquireRequest(kind="py", id="one", wait_ms=0))
    ev, _ = b.answer(1)
    assert not ev.acquired.granted and ev.acquired.reason, ev
    b.send(2, acquire=pb.AcquireRequest(kind="py", id="one", wait_ms=10000))
    a.send(2, confirm=pb.Empty())
    ev, _ = a.answer(2)
    assert ev.confirmed.safe_ms > 0, ev
    a.send(3, release=pb.ReleaseRequest(kind="py", id="one", token=token))
    ev, _ = a.answer(3)
    assert ev.released.released, ev
    ev, _ = b.answer(2)
    assert ev.acquired.granted and ev.acquired.token > token, ev
    # Errors carry the Clastor status; the stream lives on.
    b.send(3, release=pb.ReleaseRequest(kind="py", id="nope"))
    ev, _ = b.answer(3)
    assert ev.WhichOneof("event") == "released" and not ev.released.released, ev
    b.send(4, acquire=pb.AcquireRequest(kind="bad name", id="x"))
    ev, _ = b.answer(4)
    assert ev.error.status == "INVALID_NAME", ev
    # A lease that runs out is pushed as lost.
    a.send(4, acquire=pb.AcquireRequest(kind="py", id="lease", lease_ms=50))
    ev, _ = a.answer(4)
    assert ev.acquired.granted, ev
    ev = a.next()
    assert ev.WhichOneof("event") == "lost" and ev.lost.reason == pb.LOST_REASON_LEASE_EXPIRED, ev
    # Closing the stream releases: a unary session is then granted at once.
    b.close()
    a.close()

    opened = stub.OpenSession(pb.OpenSessionRequest(client_name="python"))
    sid = opened.session_id
    assert opened.idle_expiry_ms > 0
    req = pb.AcquireRequest(session_id=sid, kind="py", id="one", wait_ms=5000, request_id=7)
    first = stub.Acquire(req)
    assert first.granted, first
    again = stub.Acquire(req)
    assert again.granted and again.token == first.token, (first, again)
    try:
        stub.Acquire(pb.AcquireRequest(session_id=sid, kind="py", id="one", request_id=8))
        raise AssertionError("a second acquire of a held lock succeeded")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.ALREADY_EXISTS, e
        assert dict(e.trailing_metadata()).get("clastor-status") == "ALREADY_HELD", e.trailing_metadata()
    # A deadline that runs out: the waiting acquire is withdrawn.
    other = stub.OpenSession(pb.OpenSessionRequest()).session_id
    try:
        stub.Acquire(pb.AcquireRequest(session_id=other, kind="py", id="one", wait_ms=60000), timeout=0.2)
        raise AssertionError("granted a held lock")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.DEADLINE_EXCEEDED, e
    held = stub.Held(pb.HeldRequest(session_id=sid))
    assert [(l.kind, l.id, l.token) for l in held.locks] == [("py", "one", first.token)], held
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=sid)).closed
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=other)).closed
    try:
        stub.Confirm(pb.ConfirmRequest(session_id=sid))
        raise AssertionError("a closed session answered")
    except grpc.RpcError as e:
        assert e.code() == grpc.StatusCode.NOT_FOUND, e
    assert stub.Version(pb.VersionRequest(kind="py")).version
    print("ok", flush=True)


def secured(addr, ca, cert, key, token):
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    # The server's certificate is for 127.0.0.1 and localhost.
    options = [("grpc.ssl_target_name_override", "localhost")]
    with_cert = grpc.ssl_channel_credentials(
        root_certificates=read(ca), private_key=read(key), certificate_chain=read(cert))
    stub = rpc.LocksStub(grpc.secure_channel(addr, with_cert, options))
    bearer = [("authorization", "Bearer " + token)]

    def refused(call, code, what):
        try:
            call()
        except grpc.RpcError as e:
            assert e.code() == code, (what, e)
            return e
        raise AssertionError("%s: not refused" % what)

    # The certificate names no principal: a token is needed.
    e = refused(lambda: stub.OpenSession(pb.OpenSessionRequest()),
                grpc.StatusCode.UNAUTHENTICATED, "no token")
    assert dict(e.trailing_metadata()).get("clastor-status") == "UNAUTHENTICATED", e.trailing_metadata()
    refused(lambda: stub.OpenSession(pb.OpenSessionRequest(), metadata=[("authorization", "Bearer wrong")]),
            grpc.StatusCode.UNAUTHENTICATED, "a wrong token")
    sid = stub.OpenSession(pb.OpenSessionRequest(client_name="python-tls"), metadata=bearer).session_id
    got = stub.Acquire(pb.AcquireRequest(session_id=sid, kind="transaction", id="py", wait_ms=1000),
                       metadata=bearer)
    assert got.granted and got.token > 0, got
    # The session's calls need the credentials too.
    refused(lambda: stub.Held(pb.HeldRequest(session_id=sid)), grpc.StatusCode.UNAUTHENTICATED, "no token on a call")
    e = refused(lambda: stub.Acquire(pb.AcquireRequest(session_id=sid, kind="other", id="py"), metadata=bearer),
                grpc.StatusCode.PERMISSION_DENIED, "a kind the writer may not take")
    assert dict(e.trailing_metadata()).get("clastor-status") == "FORBIDDEN", e.trailing_metadata()
    # A stream: the same principal from its opening metadata.
    s = Stream(_with_metadata(stub, bearer))
    s.send(1, acquire=pb.AcquireRequest(kind="transaction", id="py", wait_ms=0))
    ev, _ = s.answer(1)
    assert not ev.acquired.granted, ev
    s.send(2, acquire=pb.AcquireRequest(kind="other", id="py", wait_ms=0))
    ev, _ = s.answer(2)
    assert ev.error.status == "FORBIDDEN", ev
    s.close()
    assert stub.CloseSession(pb.CloseSessionRequest(session_id=sid), metadata=bearer).closed

    # Without a client certificate the handshake is refused.
    plain_tls = grpc.ssl_channel_credentials(root_certificates=read(ca))
    bare = rpc.LocksStub(grpc.secure_channel(addr, plain_tls, options))
    refused(lambda: bare.OpenSession(pb.OpenSessionRequest(), metadata=bearer, timeout=10),
            grpc.StatusCode.UNAVAILABLE, "no client certificate")
    print("ok", flush=True)


def _with_metadata(stub, metadata):
    """The stub, with `metadata` on the Session stream it opens."""

    class WithMetadata:
        def Session(self, requests):
            return stub.Session(requests, metadata=metadata)

    return WithMetadata()


def hammer(addr, name):
    stop = threading.Event()

    def watch_stdin():
        sys.stdin.read()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    stub = rpc.LocksStub(grpc.insecure_channel(addr))
    s = Stream(stub)
    rid = 0
    while not stop.is_set():
        rid += 1
        sent = time.monotonic()
        s.send(rid, acquire=pb.AcquireRequest(kind="tx", id="hammered", wait_ms=2000))
        ev, lost = s.answer(rid, timeout=30)
        kind = ev.WhichOneof("event")
        if kind == "error":
            raise SystemExit("acquire failed: %s" % ev.error)
        if not ev.acquired.granted:
            continue
        start_ns = time.time_ns()
        # Safe-until, counted from the send; the work is a moment's.
        safe_until = sent + ev.acquired.safe_ms / 1000.0
        if ev.acquired.safe_ms == 0 or any(e.lost.token == ev.acquired.token for e in lost):
            until_ns = start_ns
        else:
            work_end = time.monotonic() + 0.0002
            while time.monotonic() < min(work_end, safe_until):
                pass
            until_ns = time.time_ns()
        print("belief %s %d %d %d" % (name, ev.acquired.token, start_ns, until_ns), flush=True)
        rid += 1
        s.send(rid, release=pb.ReleaseRequest(kind="tx", id="hammered", token=ev.acquired.token))
        s.answer(rid, timeout=30)
    s.close()


if __name__ == "__main__":
    if sys.argv[1] == "check":
        check(sys.argv[2])
    elif sys.argv[1] == "secured":
        secured(*sys.argv[2:7])
    elif sys.argv[1] == "hammer":
        hammer(sys.argv[2], sys.argv[3])
    else:
        raise SystemExit("usage: client.py check ADDR | secured ADDR CA CERT KEY TOKEN | hammer ADDR NAME")
