"""A real kazoo ReadLock and WriteLock on one path, driven line by line over
stdin, for tests/zookeeper_interop.rs: Clastor's read-write layout (Curator's
`__READ__`/`__WRIT__` node names) and kazoo's read-write locks must exclude
each other. kazoo sees other implementations' nodes only through
`extra_lock_patterns`, its documented cross-implementation option: its
reader must wait for `__WRIT__` nodes, its writer for both. Commands:
`read <ms>` / `write <ms>` (ACQUIRED or TIMEOUT), `unread` / `unwrite`
(RELEASED), `hammer <n> <hold_ms> <seed>` (n grants, reading or writing at
random, each held hold_ms: one `HOLD R|W <from> <to>` line per grant in
wall-clock ns read inside the true hold, then DONE), `quit`. Prints READY
once connected."""

import random
import time

import sys

from kazoo.client import KazooClient
from kazoo.exceptions import LockTimeout


def main():
    hosts, path = sys.argv[1], sys.argv[2]
    client = KazooClient(hosts=hosts, timeout=10.0)
    client.start(timeout=20)
    locks = {
        "read": client.ReadLock(path, "kazoo-reader", extra_lock_patterns=["__WRIT__"]),
        "write": client.WriteLock(path, "kazoo-writer", extra_lock_patterns=["__WRIT__", "__READ__"]),
    }
    print("READY", flush=True)
    for line in sys.stdin:
        words = line.split()
        if not words:
            continue
        cmd = words[0]
        if cmd in ("read", "write"):
            try:
                ok = locks[cmd].acquire(timeout=int(words[1]) / 1000.0)
            except LockTimeout:
                ok = False
            print("ACQUIRED" if ok else "TIMEOUT", flush=True)
        elif cmd in ("unread", "unwrite"):
            locks[cmd[2:]].release()
            print("RELEASED", flush=True)
        elif cmd == "hammer":
            rng = random.Random(int(words[3]))
            for _ in range(int(words[1])):
                mode = rng.choice(["read", "write"])
                try:
                    ok = locks[mode].acquire(timeout=30.0)
                except LockTimeout:
                    ok = False
                if not ok:
                    print("ERROR not acquired within 30 s", flush=True)
                    break
                start = time.time_ns()
                time.sleep(int(words[2]) / 1000.0)
                end = time.time_ns()
                locks[mode].release()
                print("HOLD %s %d %d" % ("W" if mode == "write" else "R", start, end), flush=True)
            print("DONE", flush=True)
        elif cmd == "quit":
            break
        else:
            print("ERROR unknown command " + cmd, flush=True)
    client.stop()
    client.close()


if __name__ == "__main__":
    main()
