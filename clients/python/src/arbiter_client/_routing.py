"""Slot routing: which member decides each rate-limit key.

A cluster started with `--slot-owners spread` spreads 1,024 slots over its
voters; a key's slot is CRC16/XMODEM of the key (or of its hash tag, the
text between the first `{` and the next `}` when that is not empty) modulo
1,024, as in Redis Cluster. Any member answers for any key (forwarding to
the owner), so a client that sends each check to its owner saves a hop,
and one whose map is stale or missing only loses that saving.
"""

import binascii
import time
from typing import Any, Dict, List, Optional, Sequence, Tuple

SLOTS = 1024
# An answer's owner hint reads the map again no sooner than this many
# seconds after the last read, so a member the client cannot reach (whose
# slots it sends on through any member) costs one read a second at most.
HINT_GAP = 1.0
# How long a status call made to read the map may take.
READ_TIMEOUT = 1.0


def hash_tag(key: str) -> bytes:
    """The part of `key` its slot is computed from."""
    raw = key.encode()
    start = raw.find(b"{")
    if start >= 0:
        end = raw.find(b"}", start + 1)
        if end > start + 1:
            return raw[start + 1 : end]
    return raw


def slot_of(key: str) -> int:
    """The slot `key` belongs to."""
    return binascii.crc_hqx(hash_tag(key), 0) % SLOTS


class SlotRoutes:
    """The slot map as last read, and which of the client's members each
    node id is. Read again every `refresh` seconds of use, and at once
    after a member failed a call."""

    def __init__(self, members: Sequence[str], refresh: float) -> None:
        if not members:
            raise ValueError("members must name at least one member's address")
        if refresh <= 0:
            raise ValueError("route_refresh must be > 0 seconds")
        self.members = list(members)
        self.refresh = float(refresh)
        self.owners: List[int] = []
        self.version = 0
        self.member_of_node: Dict[int, str] = {}
        self.read_at = float("-inf")
        self.last_read = float("-inf")

    def due(self) -> bool:
        return time.monotonic() - self.read_at >= self.refresh

    def stale(self) -> None:
        """A member failed: read the map again at the next call."""
        self.read_at = float("-inf")

    def hinted(self, version: int, others: Sequence[int]) -> None:
        """An answer's owner hint: the map version its node had and the
        other members owning its keys. Either says this map is stale when
        it names an owner or a newer map: read it again soon."""
        if others or version > self.version:
            soon = self.last_read + min(HINT_GAP, self.refresh) - self.refresh
            self.read_at = min(self.read_at, soon)

    def take(self, answers: Sequence[Tuple[str, Any]]) -> None:
        """Takes the members' `ClusterStatus` answers, (member, response)
        for each that answered: which node id each member is, and the
        newest map any of them has."""
        version = 0
        owners: Sequence[int] = ()
        for _, st in answers:
            if st.slot_map_version > version and st.slot_owners:
                version, owners = st.slot_map_version, st.slot_owners
        self.update(version, owners, {st.node_id: member for member, st in answers})

    def update(self, version: int, owners: Sequence[int], member_of_node: Dict[int, str]) -> None:
        self.owners = list(owners) if len(owners) == SLOTS else []
        self.version = version if self.owners else 0
        self.member_of_node = dict(member_of_node)
        self.read_at = self.last_read = time.monotonic()

    def member_for(self, key: str) -> Optional[str]:
        """The member that owns `key`'s slot, if known."""
        if not self.owners:
            return None
        return self.member_of_node.get(self.owners[slot_of(key)])

    def split(self, keys: Sequence[str]) -> List[Tuple[Optional[str], List[int]]]:
        """The positions of `keys` grouped by owner (None: not known), in
        the order each owner first appears."""
        groups: Dict[Optional[str], List[int]] = {}
        for i, key in enumerate(keys):
            groups.setdefault(self.member_for(key), []).append(i)
        return list(groups.items())
