#!/usr/bin/env python3
"""Measures replication lag by time: puts timestamped probe keys on the
source and notes when each appears in a watch on the destination.

usage: lag_probe.py SOURCE_EP DEST_EP SECONDS RATE_PER_S
prints: samples p50_ms p99_ms max_ms
Lag is from just before the probe's put starts to the watch line arriving on
the destination, so it includes one etcdctl start-up on both sides alike.
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
    lags = []

    def read():
        for line in watcher.stdout:
            now = time.time()
            try:
                sent = float(line.strip())
            except ValueError:
                continue
            lags.append((now - sent) * 1000.0)

    threading.Thread(target=read, daemon=True).start()
    time.sleep(1.0)
    end = time.time() + seconds
    i = 0
    while time.time() < end:
        i += 1
        sent = time.time()
        subprocess.run(["etcdctl", f"--endpoints={src}", "put", f"{prefix}{i}", repr(sent)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, timeout=10)
        time.sleep(max(0.0, 1.0 / rate - (time.time() - sent)))
    time.sleep(2.0)
    watcher.kill()
    watcher.wait()
    lags.sort()
    if not lags:
        print("0 - - -")
        return
    pick = lambda q: lags[min(len(lags) - 1, int(q * len(lags)))]
    print(f"{len(lags)} {pick(0.5):.1f} {pick(0.99):.1f} {lags[-1]:.1f}")


if __name__ == "__main__":
    main()
