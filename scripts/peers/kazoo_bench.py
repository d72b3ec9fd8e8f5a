"""kazoo's Lock under the same measurements as `clastor load`, for
scripts/perf.sh. Prints one JSON line in the harness' format. Usage:
  kazoo_bench.py <connect> uncontended|handoff <seconds> <warmup-seconds> <scenario>
uncontended: one session, acquire+release of its own path, one sample each.
handoff: two sessions on one path; the holder releases while the other waits;
a sample is from the release call to the waiter's acquire returning."""

import json
import os
import sys
import threading
import time

from kazoo.client import KazooClient


def connect(hosts):
    c = KazooClient(hosts=hosts, timeout=10.0)
    c.start(timeout=20)
    return c


def q(s, p):
    return s[min(len(s) - 1, int(p * len(s)))] if s else 0


def main():
    hosts, mode, seconds, warmup, scenario = sys.argv[1:6]
    seconds, warmup = float(seconds), float(warmup)
    path = "/clastor-perf/kazoo-%s-%d" % (mode, os.getpid())
    samples, errors = [], 0
    ns = time.perf_counter_ns
    start = ns()
    measured_from = start + int(warmup * 1e9)
    end = measured_from + int(seconds * 1e9)
    if mode == "uncontended":
        c = connect(hosts)
        lock = c.Lock(path, "bench")
        while ns() < end:
            t0 = ns()
            if not lock.acquire(timeout=30):
                errors += 1
                continue
            lock.release()
            t1 = ns()
            if t0 >= measured_from:
                samples.append((t1 - t0) // 1000)
        c.stop()
        c.close()
    else:
        cs = [connect(hosts), connect(hosts)]
        locks = [cs[0].Lock(path, "a"), cs[1].Lock(path, "b")]
        holder = 0
        locks[0].acquire()
        while ns() < end:
            granted = []
            waiter = locks[1 - holder]
            t = threading.Thread(target=lambda: granted.append(ns() if waiter.acquire(timeout=30) else -1))
            t.start()
            time.sleep(0.005)  # let the waiter queue, as `clastor load --op handoff` does
            t0 = ns()
            locks[holder].release()
            t.join()
            if not granted or granted[0] < 0:
                errors += 1
                break
            if t0 >= measured_from:
                samples.append((granted[0] - t0) // 1000)
            holder = 1 - holder
        locks[holder].release()
        for c in cs:
            c.stop()
            c.close()
    samples.sort()
    print(json.dumps({
        "name": "kazoo Lock " + mode, "series": "kazoo Lock", "scenario": scenario,
        "connections": 2 if mode == "handoff" else 1, "depth": 1, "ops": len(samples),
        "ops_per_s": round(len(samples) / seconds), "errors": errors,
        "p50_us": q(samples, 0.5), "p90_us": q(samples, 0.9), "p99_us": q(samples, 0.99),
        "p999_us": q(samples, 0.999), "max_us": samples[-1] if samples else 0,
    }), flush=True)


if __name__ == "__main__":
    main()
