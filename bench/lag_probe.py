#!/usr/bin/env python3
"""Measures replication lag by time: puts probe keys on the source and notes
when each appears in a watch on the destination.

usage: lag_probe.py SOURCE_EP DEST_EP SECONDS RATE_PER_S
prints: samples p50_ms p99_ms max_ms

A probe's lag runs from the moment its put returned on the source (the write
is committed there) to the moment the destination's watch printed it, floored
at 0. The source's own write latency is not counted: under load it can be
seconds, and it is not replication lag.
"""
import os
import subprocess
import sys
import threading
import time


def main():
    src, dst, seconds, rate = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    env = dict(os.environ, ETCDCTL_API="3")
    prefix = f"__probe{os.getpid()}/"
    watcher = subprocess.Popen(
        ["etcdctl", f"--endpoints={dst}", "watch", "--prefix", prefix],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
    seen = {}

    def read():
        for line in watcher.stdout:
            now = time.time()
            line = line.strip()
            if line.startswith(prefix):
                seen.setdefault(line[len(prefix):], now)

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    done = {}
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        i += 1
        start = time.time()
        subprocess.run(["etcdctl", f"--endpoints={src}", "put", f"{prefix}{i}", "x"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=30)
        done[str(i)] = time.time()
        time.sleep(max(0.0, 1.0 / rate - (time.time() - start)))
    time.sleep(3.0)
    watcher.kill()
    watcher.wait()
    lags = sorted(max(0.0, (seen[k] - t) * 1000.0) for k, t in done.items() if k in seen)
    missing = len(done) - len(lags)
    if not lags:
        print("0 - - -")
        return
    pick = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
    if os.environ.get("LAG_DUMP"):
        with open(os.environ["LAG_DUMP"], "w") as f:
            f.write("\n".join(f"{x:.1f}" for x in lags))
    # Probes never seen count as lost, reported beside the sample count.
    print(f"{len(lags)}{'' if not missing else f'+{missing}lost'} {pick(0.5):.1f} {pick(0.99):.1f} {lags[-1]:.1f}")


if __name__ == "__main__":
    main()
