"""Trip a circuit breaker shared by every process that calls a dependency:
once enough calls to it fail, every caller fails fast (BreakerOpen) instead
of waiting on it, then a few probe calls find out whether it is back, and
their successes close the breaker for everyone.

    arbiter serve &                                  # or any running Arbiter
    python3 clients/python/examples/breaker.py [HOST:PORT]
"""

import sys
import time

from arbiter_client import BreakerConfig, BreakerOpen, Client

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7070"
client = Client(target)
name = f"example/payments-{time.time_ns()}"
# Trip at half of at least 4 calls failing; stay open 300 ms; one probe at a
# time; two successful probes close it.
config = BreakerConfig(min_calls=4, failure_percent=50, open_for=0.3, probes=1, probes_to_close=2)
dependency_up = False


@client.circuit_breaker(name, config)
def charge(n: int) -> str:
    # The call the breaker guards: it raises while the dependency is down.
    if not dependency_up:
        raise ConnectionError("payments service down")
    return f"charged order {n}"


def attempt(n: int) -> None:
    try:
        print(charge(n))
    except BreakerOpen as e:
        print(f"order {n}: not tried, breaker {e.phase}, retry after {e.retry_after:.2f} s")
    except ConnectionError as e:
        print(f"order {n}: failed ({e})")


for n in range(6):
    attempt(n)
# The dependency comes back; callers wait out the open time, then probe.
dependency_up = True
deadline = time.monotonic() + 10
while client.breakers.get(name, config).phase != "CLOSED" and time.monotonic() < deadline:
    time.sleep(0.05)  # the pace of this demo's callers, not a synchronisation
    try:
        print(charge(100))
    except BreakerOpen:
        pass
print("breaker:", client.breakers.get(name, config).phase)
client.close()
