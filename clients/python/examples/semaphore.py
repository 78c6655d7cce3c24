"""Cap how many workers run at once, across every process that shares the
semaphore's name: each worker holds one permit while it runs (renewed in
the background), and the others wait, woken by Arbiter when a permit is
given back rather than by polling.

    arbiter serve &                                  # or any running Arbiter
    python3 clients/python/examples/semaphore.py [HOST:PORT]
"""

import sys
import threading
import time

from arbiter_client import Client

target = sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:7070"
running = []
lock = threading.Lock()


def job(client: Client, n: int) -> None:
    # At most 2 of these at once, however many processes run them.
    with client.semaphore("example/reports", limit=2, ttl=10, timeout=30) as permit:
        with lock:
            running.append(n)
            print(f"job {n} runs beside {len(running) - 1} other(s), fencing token {permit.fencing_token}")
        time.sleep(0.2)
        with lock:
            running.remove(n)


with Client(target) as client:
    workers = [threading.Thread(target=job, args=(client, n)) for n in range(5)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    print("held after:", client.semaphores.get("example/reports").held)
