"""A candidate in its own process, for test_processes: campaigns, prints
"LEADER <token>" when it leads, and holds on until killed (printing "LOST"
if it loses the lease)."""

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "src"))

import arbiter_client as ac  # noqa: E402


def main() -> None:
    target, name, candidate, ttl = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    with ac.Client(target) as client:
        election = client.election(name, candidate, ttl=ttl)
        leader = election.campaign(timeout=60)
        print(f"LEADER {leader.fencing_token}", flush=True)
        election.lost.wait(timeout=60)
        print("LOST", flush=True)


if __name__ == "__main__":
    main()
