"""A real kazoo Lock (with extra_lock_patterns=["-lock-"], kazoo's documented
cross-implementation option), driven line by line over stdin, for
tests/zookeeper_interop.rs: Clastor and kazoo must exclude each other on the
same lock path. Commands: `acquire <ms>` (answers ACQUIRED or TIMEOUT),
`release` (RELEASED), `delete <path>` (DELETED or the error's name: how a
client without the credentials of a secured tree is refused), `quit`.
Prints READY once connected. `KAZOO_DIGEST=user:password` authenticates."""

import os
import sys

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout


def main():
    hosts, path = sys.argv[1], sys.argv[2]
    # Digest credentials (`user:password`) for a secured Clastor tree.
    digest = os.environ.get("KAZOO_DIGEST")
    auth = [("digest", digest)] if digest else None
    client = KazooClient(hosts=hosts, timeout=10.0, auth_data=auth)
    client.start(timeout=20)
    # kazoo only sees its own `__lock__` nodes unless told about others:
    # `-lock-` makes Curator-named (and so Clastor) nodes contenders too.
    lock = client.Lock(path, "kazoo-interop", extra_lock_patterns=["-lock-"])
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        if words[0] == "acquire":
            try:
                ok = lock.acquire(timeout=int(words[1]) / 1000.0)
            except LockTimeout:
                ok = False
            print("ACQUIRED" if ok else "TIMEOUT", flush=True)
        elif words[0] == "release":
            lock.release()
            print("RELEASED", flush=True)
        elif words[0] == "delete":
            try:
                client.delete(words[1])
                print("DELETED", flush=True)
            except Exception as e:  # the refusal is the answer
                print(type(e).__name__, flush=True)
        elif words[0] == "quit":
            break
        else:
            print("ERROR unknown command " + words[0], flush=True)
    client.stop()
    client.close()


if __name__ == "__main__":
    main()
