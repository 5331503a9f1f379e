"""Common Message-API plumbing for the baseline defences.

:class:`UpdateDefense` is a :class:`flwr.serverapp.strategy.FedAvg` that

1. keeps the global arrays ``w_t`` it sends in ``configure_train``;
2. in ``aggregate_train`` drops error replies, validates the rest like FedAvg,
   and turns them into flat *updates* ``w_i - w_t`` over the trainable keys;
3. asks the subclass (:meth:`UpdateDefense.defend`) for the aggregated update,
   the weights used to average the non-trainable entries (BatchNorm
   statistics) and the per-client decisions;
4. returns ``w_t + update`` as the new global model and stores the decisions in
   ``last_round_report``. Training metrics are FedAvg's aggregate over all valid
   replies (what clients reported, whether accepted or not).

Defences only ever read each reply's ``"arrays"`` ArrayRecord and the
``num-examples`` metric; never the ``"ground-truth"`` ConfigRecord.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from . import update_math as um


class DefenseConfigError(ValueError):
    """A defence setting has a value outside its allowed range."""


@dataclass
class RoundInput:
    """What a defence sees of one training round.

    Attributes
    ----------
    server_round : int
        The round being aggregated.
    node_ids : list[int]
        ``src_node_id`` of each valid reply, in reply order.
    updates : np.ndarray
        float32 ``[K, D]``: row ``i`` is ``w_i - w_t`` over ``trainable_keys``.
    num_examples : np.ndarray
        float64 ``[K]``: the ``weighted_by_key`` metric of each reply.
    global_state : dict[str, np.ndarray]
        ``w_t``, the arrays sent to the clients this round.
    trainable_keys : list[str]
        Keys covered by ``updates`` (BatchNorm statistics excluded).
    """

    server_round: int
    node_ids: list[int]
    updates: np.ndarray
    num_examples: np.ndarray
    global_state: dict[str, np.ndarray]
    trainable_keys: list[str]


@dataclass
class Decision:
    """A defence's answer for one round.

    Attributes
    ----------
    update : np.ndarray or None
        Aggregated update over the trainable keys (``[D]``), or None to keep the
        global model unchanged.
    buffer_weights : np.ndarray or None
        ``[K]`` weights for averaging the non-trainable entries over clients;
        None (or zero sum) keeps the global values.
    accepted, rejected : list[int]
        Node ids kept / discarded by the defence.
    scores : dict[int, float]
        One number per node (meaning documented by each defence).
    reasons : dict[int, str]
        Short human-readable reason per node.
    summary : str
        The INFO line logged for the round.
    extra : dict
        Defence-specific round facts copied into ``last_round_report``.
    """

    update: np.ndarray | None
    buffer_weights: np.ndarray | None
    accepted: list[int]
    rejected: list[int]
    scores: dict[int, float]
    reasons: dict[int, str]
    summary: str
    extra: dict = field(default_factory=dict)


def arrays_to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    """Numpy view of an ArrayRecord, keeping its keys and order."""
    return {k: v.numpy() for k, v in record.items()}


def state_to_arrays(state: dict[str, np.ndarray]) -> ArrayRecord:
    """ArrayRecord holding ``state`` under the same keys."""
    return ArrayRecord({k: Array(np.array(v, order="C")) for k, v in state.items()})


class UpdateDefense(FedAvg):
    """FedAvg whose aggregation is replaced by an update-based defence.

    Subclasses implement :meth:`defend`. Parameters are those of
    :class:`flwr.serverapp.strategy.FedAvg` plus:

    Parameters
    ----------
    trainable_keys : Collection[str] or None (default: None)
        State-dict keys of the trainable parameters. None: every float array
        whose name does not end in ``running_mean``, ``running_var`` or
        ``num_batches_tracked``. Pass ``[n for n, p in model.named_parameters()]``
        to also exclude other buffers.
    """

    name = "defense"

    # pylint: disable=too-many-arguments
    def __init__(
        self,
        *,
        fraction_train: float = 1.0,
        fraction_evaluate: float = 1.0,
        min_train_nodes: int = 2,
        min_evaluate_nodes: int = 2,
        min_available_nodes: int = 2,
        weighted_by_key: str = "num-examples",
        arrayrecord_key: str = "arrays",
        configrecord_key: str = "config",
        train_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]
        | None = None,
        evaluate_metrics_aggr_fn: Callable[[list[RecordDict], str], MetricRecord]
        | None = None,
        trainable_keys: Collection[str] | None = None,
    ) -> None:
        super().__init__(
            fraction_train=fraction_train,
            fraction_evaluate=fraction_evaluate,
            min_train_nodes=min_train_nodes,
            min_evaluate_nodes=min_evaluate_nodes,
            min_available_nodes=min_available_nodes,
            weighted_by_key=weighted_by_key,
            arrayrecord_key=arrayrecord_key,
            configrecord_key=configrecord_key,
            train_metrics_aggr_fn=train_metrics_aggr_fn,
            evaluate_metrics_aggr_fn=evaluate_metrics_aggr_fn,
        )
        self.trainable_keys = None if trainable_keys is None else list(trainable_keys)
        self.current_arrays: ArrayRecord | None = None
        self.last_round_report: dict = {}

    # ------------------------------------------------------------------ hooks
    def defend(self, rnd: RoundInput) -> Decision:
        """Aggregate one round's updates (implemented by each defence)."""
        raise NotImplementedError

    # ------------------------------------------------------------ Message API
    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Remember ``w_t`` (the arrays sent this round), then configure as FedAvg."""
        self.current_arrays = arrays
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Defend, aggregate and report one training round."""
        start = time.perf_counter()
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            self.last_round_report = _empty_report(time.perf_counter() - start)
            log(WARNING, "%s round %d: no valid replies, global model kept",
                self.name, server_round)
            return None, None
        if self.current_arrays is None:
            raise RuntimeError(
                f"{type(self).__name__}.aggregate_train called before configure_train: "
                "the global arrays w_t are unknown"
            )

        global_state = arrays_to_state(self.current_arrays)
        client_states = [arrays_to_state(_only_arrays(m)) for m in valid]
        _check_same_keys(global_state, client_states[0])
        keys = um.select_trainable_keys(global_state, self.trainable_keys)
        rnd = RoundInput(
            server_round=server_round,
            node_ids=[int(m.metadata.src_node_id) for m in valid],
            updates=um.flat_updates(client_states, global_state, keys),
            num_examples=np.array(
                [float(m.content.metric_records[_metric_key(m)][self.weighted_by_key])
                 for m in valid]
            ),
            global_state=global_state,
            trainable_keys=keys,
        )
        decision = self.defend(rnd)
        new_state = _apply(decision, rnd, client_states)

        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        self.last_round_report = {
            "accepted": list(decision.accepted),
            "rejected": list(decision.rejected),
            "scores": dict(decision.scores),
            "reasons": dict(decision.reasons),
            "seconds": time.perf_counter() - start,
            **decision.extra,
        }
        log(INFO, "%s round %d: %s (%.2fs)", self.name, server_round,
            decision.summary, self.last_round_report["seconds"])
        return state_to_arrays(new_state), metrics


def _only_arrays(message: Message) -> ArrayRecord:
    """The reply's single ArrayRecord (FedAvg's validation guarantees exactly one)."""
    return next(iter(message.content.array_records.values()))


def _metric_key(message: Message) -> str:
    return next(iter(message.content.metric_records.keys()))


def _check_same_keys(global_state: dict, client_state: dict) -> None:
    if set(global_state) != set(client_state):
        diff = sorted(set(global_state) ^ set(client_state))
        raise ValueError(
            f"reply arrays do not match the global arrays (differing keys: {diff[:5]})"
        )


def _apply(
    decision: Decision, rnd: RoundInput, client_states: list[dict[str, np.ndarray]]
) -> dict[str, np.ndarray]:
    """Build ``w_t + update`` (trainable) and averaged buffers, in the global dtypes."""
    g = rnd.global_state
    new: dict[str, np.ndarray] = {k: np.array(v, copy=True) for k, v in g.items()}
    if decision.update is not None:
        delta = um.unflatten(decision.update, g, rnd.trainable_keys)
        for k, d in delta.items():
            new[k] = um.cast_like(np.asarray(g[k], dtype=np.float64) + d, g[k])
    other = [k for k in g if k not in set(rnd.trainable_keys)]
    weights = decision.buffer_weights
    if other and weights is not None and float(np.sum(weights)) > 0:
        for k, v in um.average_states(client_states, weights, other).items():
            new[k] = um.cast_like(v, g[k])
    return new


def _empty_report(seconds: float) -> dict:
    return {"accepted": [], "rejected": [], "scores": {}, "reasons": {},
            "seconds": seconds}
