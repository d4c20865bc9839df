"""server.grid.PromptGrid: the reply loop of Flower's grids with a short pull interval."""

from __future__ import annotations

import time
from types import SimpleNamespace

from flwr.serverapp import Grid

from server.grid import PromptGrid


class SlowSuperLink(Grid):
    """A grid whose replies to the pushed ids become available on the given pull (1-based)."""

    def __init__(self, ready_on_pull: dict[str, int]) -> None:
        self.ready_on_pull = ready_on_pull
        self.pulls = 0
        self.pulled_ids: list[set[str]] = []

    def set_run(self, run) -> None: ...

    @property
    def run(self):
        return None

    def create_message(self, *args, **kwargs): ...

    def get_node_ids(self):
        return []

    def push_messages(self, messages):
        return [m for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        self.pulled_ids.append(set(message_ids))
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=i))
                for i in message_ids if self.ready_on_pull[i] == self.pulls]

    def send_and_receive(self, messages, *, timeout=None):
        raise AssertionError("PromptGrid must not fall back to the wrapped grid's 3 s loop")


def test_collects_every_reply_asking_only_for_the_missing_ones():
    link = SlowSuperLink({"a": 1, "b": 3, "c": 3})
    started = time.monotonic()
    replies = PromptGrid(link, pull_interval=0.05).send_and_receive(["a", "b", "c"], timeout=30)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]
    assert link.pulls == 3
    assert link.pulled_ids == [{"a", "b", "c"}, {"b", "c"}, {"b", "c"}]
    assert time.monotonic() - started < 1.0  # two waits of 0.05 s, not Flower's 3 s


def test_gives_up_after_the_timeout_with_what_came():
    link = SlowSuperLink({"a": 2, "b": 10**9})
    started = time.monotonic()
    replies = PromptGrid(link, pull_interval=0.05).send_and_receive(["a", "b"], timeout=0.5)
    waited = time.monotonic() - started
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]
    assert 0.5 <= waited < 1.5
    assert link.pulls >= 5


def test_everything_else_is_the_wrapped_grids():
    link = SlowSuperLink({})
    grid = PromptGrid(link)
    assert grid.push_messages(["x"]) == ["x"]
    assert grid.pull_messages([]) == [] and link.pulls == 1
    assert list(grid.get_node_ids()) == []
