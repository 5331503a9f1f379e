"""In-process Flower 1.42 harness: run Message-API strategies without Ray or a SuperLink.

* :class:`FakeGrid` is a :class:`flwr.serverapp.Grid` that delivers each message
  straight to a callable ``app(message, context) -> Message`` (a ``ClientApp`` is
  one) and hands back its reply. Use it as a context manager so that the
  process-wide ``TaskIdentity`` that ``Message(content, dst_node_id, ...)`` needs
  is set for the run and restored afterwards::

      with FakeGrid(client_app, num_nodes=4) as grid:
          result = strategy.start(grid=grid, initial_arrays=arrays, num_rounds=2)

* :func:`reply_message` / :func:`error_reply` build reply Messages from a node
  directly (no TaskIdentity needed) for unit tests of ``aggregate_train``.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import Metadata
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

SERVER_NODE_ID = 1  # flwr.common.constant.SUPERLINK_NODE_ID


@contextmanager
def preserved_task_identity() -> Iterator[None]:
    """Restore Flower's process-global ``TaskIdentity`` on exit (LocalGrid and Messages set it)."""
    saved = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)  # pylint: disable=protected-access
    try:
        yield
    finally:
        TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = saved  # pylint: disable=protected-access


@contextmanager
def task_identity(run_id: int = 1, node_id: int = SERVER_NODE_ID, task_id: int = 1) -> Iterator[None]:
    """Set ``TaskIdentity`` (as the ServerApp runtime does) and restore it on exit."""
    with preserved_task_identity():
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = run_id, node_id, task_id
        yield


def _reply_metadata(src_node_id: int, run_id: int, message_type: str, group_id: str) -> Metadata:
    return Metadata(
        run_id=run_id,
        message_id=uuid.uuid4().hex,
        src_node_id=src_node_id,
        dst_node_id=SERVER_NODE_ID,
        reply_to_message_id="",
        group_id=group_id,
        created_at=time.time(),
        ttl=3600.0,
        message_type=message_type,
    )


def reply_message(
    content: RecordDict, src_node_id: int, *, run_id: int = 1, message_type: str = "train", group_id: str = ""
) -> Message:
    """A reply from node ``src_node_id`` carrying ``content``."""
    return Message(content=content, metadata=_reply_metadata(src_node_id, run_id, message_type, group_id))


def error_reply(
    src_node_id: int, *, reason: str = "client failed", code: int = 0, run_id: int = 1, message_type: str = "train"
) -> Message:
    """An error reply from node ``src_node_id`` (``has_error()`` is True)."""
    return Message(error=Error(code=code, reason=reason), metadata=_reply_metadata(src_node_id, run_id, message_type, ""))


class FakeGrid(Grid):
    """A Grid that runs ``app(message, context)`` in-process for every message.

    Parameters
    ----------
    app : Callable[[Message, Context], Message]
        The client side, e.g. a ``flwr.clientapp.ClientApp``.
    num_nodes : int
        Number of simulated nodes; node ``i`` gets ``node_config
        {"partition-id": i, "num-partitions": num_nodes}``.
    run_config : dict or None (default: None)
        ``context.run_config`` of every node.
    run_id : int (default: 1)
        Run id used for the Context and ``TaskIdentity``.
    seed : int (default: 0)
        Seed of the random 63-bit node ids.

    Attributes
    ----------
    node_ids : list[int]
        Node ids, in partition order.
    partition_of : dict[int, int]
        Node id -> partition id.
    sent : list[list[Message]]
        Every batch of messages passed to ``send_and_receive``.
    """

    def __init__(
        self,
        app: Callable[[Message, Context], Message],
        num_nodes: int,
        *,
        run_config: dict[str, Any] | None = None,
        run_id: int = 1,
        seed: int = 0,
    ) -> None:
        rng = np.random.default_rng(seed)
        self.app = app
        self.node_ids = [int(x) for x in rng.integers(2, 2**62, size=num_nodes)]
        self.partition_of = {n: i for i, n in enumerate(self.node_ids)}
        self.contexts = {
            n: Context(
                run_id=run_id,
                node_id=n,
                node_config={"partition-id": i, "num-partitions": num_nodes},
                state=RecordDict(),
                run_config=dict(run_config or {}),
            )
            for n, i in self.partition_of.items()
        }
        self._run = Run.create_empty(run_id)
        self._run_id = run_id
        self._replies: dict[str, Message] = {}
        self._identity = None
        self.sent: list[list[Message]] = []

    def __enter__(self) -> FakeGrid:
        self._identity = task_identity(run_id=self._run_id)
        self._identity.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._identity is not None
        self._identity.__exit__(*exc)
        self._identity = None

    # --- Grid API
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for msg in messages:
            msg_id = uuid.uuid4().hex
            msg.metadata.__dict__["_message_id"] = msg_id  # the SuperLink sets this
            # the client gets its own copy, as over the wire
            delivered = Message(content=copy.deepcopy(msg.content), metadata=copy.copy(msg.metadata))
            try:
                reply = self.app(delivered, self.contexts[msg.metadata.dst_node_id])
            except Exception as err:  # pylint: disable=broad-except
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=delivered)
            self._replies[msg_id] = reply
            ids.append(msg_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in message_ids if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        self.sent.append(messages)
        return self.pull_messages(self.push_messages(messages))
