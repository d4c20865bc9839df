"""The ServerApp's grid with a shorter wait between asks for replies.

Flower 1.41's deployment grid (``HttpGrid.send_and_receive``) asks the SuperLink for replies
every 3 s, a constant in its code; a reply that arrives just after an ask waits up to 3 s more,
in every train and evaluate phase of every round (the simulation's in-memory grid asks every
0.1 s). ``PromptGrid`` runs the same loop over the grid's own ``push_messages`` and
``pull_messages`` with a configurable interval; everything else is the wrapped grid's.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

PULL_INTERVAL_S = 0.1


class PromptGrid(Grid):
    """``grid`` asking for replies every ``pull_interval`` seconds in ``send_and_receive``."""

    def __init__(self, grid: Grid, pull_interval: float = PULL_INTERVAL_S) -> None:
        self.grid = grid
        self.pull_interval = pull_interval

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages``, then pull their replies until all came or ``timeout`` seconds
        passed (None: no limit), as Flower's grids do."""
        waiting = set(self.push_messages(messages))
        end = time.monotonic() + (timeout or 0.0)
        replies: list[Message] = []
        while timeout is None or time.monotonic() < end:
            pulled = list(self.pull_messages(waiting))
            replies.extend(pulled)
            waiting.difference_update(m.metadata.reply_to_message_id for m in pulled)
            if not waiting:
                break
            time.sleep(self.pull_interval)
        return replies
