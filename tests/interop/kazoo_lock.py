"""A real kazoo Lock (with extra_lock_patterns=["-lock-"], kazoo's documented
cross-implementation option), driven line by line over stdin, for
tests/zookeeper_interop.rs: Clastor and kazoo must exclude each other on the
same lock path. Commands: `acquire <ms>` (answers ACQUIRED or TIMEOUT),
`release` (RELEASED), `quit`. Prints READY once connected."""

import sys

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout


def main():
    hosts, path = sys.argv[1], sys.argv[2]
    client = KazooClient(hosts=hosts, timeout=10.0)
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
        elif words[0] == "quit":
            break
        else:
            print("ERROR unknown command " + words[0], flush=True)
    client.stop()
    client.close()


if __name__ == "__main__":
    main()
