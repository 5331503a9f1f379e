"""Run the real ServerApp and ClientApp in one process, without Ray or a SuperLink.

:class:`LocalGrid` implements Flower's ``Grid`` by calling the ClientApp directly for each message,
one node after another, with ``node_config = {"partition-id": i, "num-partitions": N}`` exactly as
the simulation engine sets it. Tests and benchmarks use it (it starts in milliseconds); the
end-to-end test and users go through ``flwr run``. A node listed in ``fail_nodes`` answers with an
error, and a ``reply_hook`` may rewrite replies (hostile-client tests).
"""

from __future__ import annotations

import difflib
import itertools
import tomllib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.clientapp import ClientApp
from flwr.supercore.run import Run
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.task_identity import TaskIdentity

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def default_run_config() -> dict[str, Any]:
    """``[tool.flwr.app.config]`` of this project's pyproject.toml."""
    with open(PROJECT_ROOT / "pyproject.toml", "rb") as f:
        return dict(tomllib.load(f)["tool"]["flwr"]["app"]["config"])


class LocalGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process."""

    def __init__(self, client_app: ClientApp, num_nodes: int, run_config: dict[str, Any], run_id: int = 1,
                 fail_nodes: Iterable[int] = (), reply_hook: Callable[[int, Message], Message] | None = None) -> None:
        self.client_app = client_app
        self.node_ids = [1000 + i for i in range(num_nodes)]
        self.contexts = {
            nid: Context(run_id=run_id, node_id=nid, node_config={"partition-id": i, "num-partitions": num_nodes},
                         state=RecordDict(), run_config=dict(run_config))
            for i, nid in enumerate(self.node_ids)
        }
        self.fail_nodes = set(fail_nodes)
        self.reply_hook = reply_hook
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        TaskIdentity.run_id = run_id
        TaskIdentity.node_id = 0
        TaskIdentity.task_id = 1

    def set_run(self, run: Run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self) -> Run:  # type: ignore[override]
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):  # type: ignore[override]
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("LocalGrid answers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("LocalGrid answers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        replies = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = f"m{next(self._ids)}"  # the SuperLink would set it
            nid = msg.metadata.dst_node_id
            if nid in self.fail_nodes:
                replies.append(Message(Error(code=0, reason=f"node {nid} failed (simulated)"), reply_to=msg))
                continue
            try:
                reply = self.client_app(msg, self.contexts[nid])
            except Exception as err:  # a crashing client is an error reply, as in Flower
                reply = Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)
            if self.reply_hook is not None:
                reply = self.reply_hook(self.node_ids.index(nid), reply)
            replies.append(reply)
        return replies


def run_inprocess(overrides: dict[str, Any] | None = None, *, server_app: ServerApp | None = None,
                  client_app: ClientApp | None = None, fail_nodes: Iterable[int] = (),
                  reply_hook: Callable[[int, Message], Message] | None = None) -> Path:
    """Run one federation in-process with the project defaults + ``overrides``; returns the results dir."""
    from client_app.app import app as default_client
    from fltask.config import parse_run_config
    from server_app.app import app as default_server

    run_config = default_run_config()
    run_config.update(overrides or {})
    cfg = parse_run_config(run_config)
    grid = LocalGrid(client_app or default_client, cfg.num_clients, run_config, fail_nodes=fail_nodes,
                     reply_hook=reply_hook)
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    (server_app or default_server)(grid, ctx)
    return cfg.results_path


def _parse_value(text: str) -> Any:
    """``key=value`` values as TOML scalars (numbers, booleans, quoted strings), else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def parse_overrides(args: list[str], known: Iterable[str] | None = None) -> dict[str, Any]:
    """``["key=value", ...]`` command-line run-config overrides (values as TOML scalars).

    With ``known`` (the run-config keys), a key outside it is an error naming the closest known keys,
    instead of a setting that is silently ignored.
    """
    bad = [a for a in args if "=" not in a]
    if bad:
        raise ValueError(f"arguments must be run-config key=value pairs, got {bad}")
    overrides = {k: _parse_value(v) for k, v in (a.split("=", 1) for a in args)}
    if known is not None:
        known = list(known)
        for key in overrides:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=3, cutoff=0.5)
                hint = f"; did you mean {', '.join(close)}?" if close else ""
                raise ValueError(f"unknown run-config key {key!r} (see [tool.flwr.app.config] in pyproject.toml){hint}")
    return overrides


def main(argv: list[str] | None = None) -> int:
    """``python -m server_app.inprocess key=value ...``: one federation in-process (no Ray, no
    SuperLink) with the pyproject defaults overridden; prints MA / ASR / screening per round."""
    import json
    import sys
    import time

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(main.__doc__)
        return 0
    try:
        overrides = parse_overrides(args, known=default_run_config())
    except ValueError as err:
        print(err, file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    out = run_inprocess(overrides)
    metrics = json.loads((out / "metrics.json").read_text())
    def fmt(v: float | None) -> str:
        return "-" if v is None else f"{v:.2f}"

    print(f"{'round':>5} {'MA':>6} {'ASR':>6} {'rejected':>8} {'TPR':>5} {'FPR':>5}")
    for r in metrics["rounds"]:
        print(f"{r['round']:>5} {100 * r['ma']:>5.1f}% {100 * r['asr']:>5.1f}% {str(r.get('num_rejected', '-')):>8} "
              f"{fmt(r.get('tpr')):>5} {fmt(r.get('fpr')):>5}")
    print(f"wall {time.perf_counter() - t0:.1f} s; results in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
