"""Shape work to a steady rate across every process that shares a key: each
`acquire()` reserves a start time from Arbiter (a leaky bucket in reserve
mode) and sleeps until it, instead of being refused and retrying.

    arbiter serve &                                  # or any running Arbiter
    python3 clients/python/examples/shape.py [HOST:PORT]
"""

import sys
import time

from arbiter_client import Client, LeakyBucket

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7070"

with Client(target) as client:
    # 5 a second, 2 at once; a caller waits at most 2 s for its turn.
    emails = client.limiter("example/outbound-email", LeakyBucket(rate=5, per=1.0, burst=2), max_delay=2.0)
    start = time.monotonic()
    for n in range(8):
        decision = emails.acquire(timeout=10)
        print(f"email {n} sent at {time.monotonic() - start:.2f} s (waited {decision.delay:.2f} s)")

    # Or decide for yourself: reserve() answers at once and never sleeps.
    report = client.reserve("example/nightly-report", LeakyBucket(rate=1, per=60), max_delay=120)
    if report.allowed:
        print(f"report: start in {report.delay:.1f} s")
    else:
        print(f"report: queue full, ask again in {report.retry_after:.1f} s")
