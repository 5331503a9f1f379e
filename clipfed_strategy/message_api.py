"""CLIP-Fed for Flower's Message API: a wrapper around any inner strategy.

Like Flower's differential-privacy wrappers, :class:`CLIPFed` wraps an inner strategy (FedAvg,
FedProx, FedAdam, FedMedian, …) and intercepts training::

    strategy = CLIPFed(FedAvg(fraction_train=0.5), defense)     # the one-line swap

Each round ``aggregate_train`` runs: validate → screen → inner aggregation → distil → report.
Rejected replies never reach the inner strategy. Evaluation and ``summary`` are delegated.
Paper: Gai et al., "A Vision-Language Pre-training Model-Guided Approach for Mitigating Backdoor
Attacks in Federated Learning", https://arxiv.org/abs/2508.10315 (clipfed reconstructs it from the
abstract; see README).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from clipfed_strategy.core import CLIPFedDefense, ClientUpdate, screening_details

log = logging.getLogger(__name__)


class CLIPFed(Strategy):
    """CLIP-Fed defence around an inner Message-API strategy.

    Parameters
    ----------
    strategy : flwr.serverapp.strategy.Strategy
        The inner strategy that aggregates the kept replies (e.g. ``FedAvg(...)``).
    defense : CLIPFedDefense
        The torch core (teacher outputs, server dataset, screening and distillation settings).
    weighted_by_key : str, default "num-examples"
        Metric holding a reply's example count (the inner strategy's ``weighted_by_key``).
    arrayrecord_key : str, default "arrays"
        Name of the ArrayRecord holding the client's model in replies.
    metricrecord_key : str, default "metrics"
        Name of the MetricRecord in replies.

    Attributes
    ----------
    last_round_report : dict
        The latest round's decisions: ``accepted``/``rejected`` node ids, ``scores``, the
        aggregation ``weights`` of the kept replies (after soft down-weighting), ``reasons``,
        ``metrics_dropped`` (client metrics not reported alike by all kept replies),
        per-phase ``seconds``, distillation losses and the teacher's label.
    """

    def __init__(self, strategy: Strategy, defense: CLIPFedDefense, weighted_by_key: str = "num-examples",
                 arrayrecord_key: str = "arrays", metricrecord_key: str = "metrics") -> None:
        super().__init__()
        self.strategy = strategy
        self.defense = defense
        self.weighted_by_key = getattr(strategy, "weighted_by_key", weighted_by_key)
        self.arrayrecord_key = getattr(strategy, "arrayrecord_key", arrayrecord_key)
        self.metricrecord_key = metricrecord_key
        self.current: dict[str, np.ndarray] | None = None
        self.last_round_report: dict[str, Any] = {}

    def __repr__(self) -> str:
        return f"CLIPFed({self.strategy!r})"

    def summary(self) -> None:
        log.info("CLIP-Fed wrapper (%s) around:", self.defense.teacher_info["label"])
        self.strategy.summary()

    # ------------------------------------------------------------------ training
    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.current = {k: a.numpy() for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        t0 = time.perf_counter()
        replies = list(replies)
        if self.current is None:
            raise RuntimeError("CLIPFed.aggregate_train called before configure_train")
        rejected: dict[int, str] = {}
        parsed: list[tuple[Message, dict[str, Any], Any]] = []
        for m in replies:
            node = m.metadata.src_node_id
            if m.has_error():
                rejected[node] = f"client error: {m.error.reason}"
                continue
            state, n, reason = self._parse(m)
            if reason:
                rejected[node] = reason
            else:
                parsed.append((m, state, n))
        reasons = self.defense.validate(self.current, [(s, n) for _, s, n in parsed])
        valid = []
        for (m, s, n), reason in zip(parsed, reasons):
            if reason:
                rejected[m.metadata.src_node_id] = reason
            else:
                valid.append((m, ClientUpdate(str(m.metadata.src_node_id), s, float(n))))
        t_valid = time.perf_counter()

        outcome = self.defense.screen(server_round, self.current, [u for _, u in valid])
        kept: list[Message] = []
        scores: dict[int, float] = {}
        details: dict[int, dict[str, float]] = {}
        weights: dict[int, float] = {}
        purified = [m.metadata.src_node_id for (m, _), p in zip(valid, outcome.purified) if p]
        for (m, u), w, rec, st in zip(valid, outcome.weights, outcome.records, outcome.states):
            node = m.metadata.src_node_id
            if "score" in rec:
                scores[node] = rec["score"]
            details[node] = screening_details(rec)
            if w <= 0:
                rejected[node] = f"screening: {rec.get('reason', 'flagged')}"
                continue
            weights[node] = float(w)
            if w != u.num_examples:
                m.content[self.metricrecord_key][self.weighted_by_key] = float(w)
            if st is not u.state:
                m.content[self.arrayrecord_key] = ArrayRecord({k: Array(np.asarray(v, order="C")) for k, v in st.items()})
            kept.append(m)
        for node, reason in rejected.items():
            log.info("round %d: rejected node %s: %s", server_round, node, reason)
        for node in purified:
            log.info("round %d: flagged node %s purified and aggregated", server_round, node)
        t_screen = time.perf_counter()

        dropped_metrics = self._harmonise_metrics(server_round, kept)
        arrays, metrics = (None, None)
        if kept:
            arrays, metrics = self.strategy.aggregate_train(server_round, kept)
        t_agg = time.perf_counter()
        dstats: dict[str, float] = {}
        if arrays is not None:
            state, dstats = self.defense.distill(server_round, arrays.to_torch_state_dict())
            arrays = self._like_global(ArrayRecord(state))
        else:
            log.warning("round %d: no reply was accepted (%d rejected): keeping the previous global model",
                        server_round, len(rejected))
        t_end = time.perf_counter()

        seconds = {"validate": t_valid - t0, "screen": t_screen - t_valid, "aggregate": t_agg - t_screen,
                   "distill": t_end - t_agg}
        self.last_round_report = {
            "accepted": [m.metadata.src_node_id for m in kept],
            "rejected": sorted(rejected),
            "purified": purified,
            "scores": scores,
            "screening": details,
            "weights": weights,
            "reasons": rejected,
            "metrics_dropped": dropped_metrics,
            "seconds": seconds,
            "distill": dstats,
            "screen_enforced": outcome.enforced,
            "inversion": outcome.info.get("inversion"),
            "clip_norm": outcome.clip_norm,
            "kept_previous_model": arrays is None,
            "teacher": self.defense.teacher_info["label"],
        }
        log.info("round %d: CLIP-Fed kept %d/%d replies, rejected %d; screen %.2fs, distil %.2fs%s", server_round,
                 len(kept), len(replies), len(rejected), seconds["screen"], seconds["distill"],
                 f" (KL {dstats['kl']:.3f}, PCL {dstats['pcl']:.3f})" if dstats.get("kl") is not None else "")
        out = MetricRecord(dict(metrics)) if metrics is not None else MetricRecord()
        out["clipfed-accepted"] = len(kept)
        out["clipfed-rejected"] = len(rejected)
        for k, v in seconds.items():
            out[f"clipfed-seconds-{k}"] = float(v)
        return arrays, out

    def _harmonise_metrics(self, server_round: int, kept: list[Message]) -> list[str]:
        return harmonise_metrics(server_round, kept, self.metricrecord_key)

    def _like_global(self, arrays: ArrayRecord) -> ArrayRecord:
        assert self.current is not None
        return like_reference(arrays, self.current)

    def _parse(self, m: Message) -> tuple[dict[str, np.ndarray], Any, str | None]:
        return parse_reply(m, self.arrayrecord_key, self.metricrecord_key, self.weighted_by_key)

    # ------------------------------------------------------------------ evaluation (delegated)
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        return self.strategy.configure_evaluate(server_round, arrays, config, grid)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)


# ---------------------------------------------------------------------------- reply helpers
def parse_reply(m: Message, arrayrecord_key: str = "arrays", metricrecord_key: str = "metrics",
                weighted_by_key: str = "num-examples") -> tuple[dict[str, np.ndarray], Any, str | None]:
    """The reply's model state and example count, or a reason it is malformed."""
    arrays = m.content.array_records
    metrics = m.content.metric_records
    if list(arrays.keys()) != [arrayrecord_key]:
        return {}, None, f"expected exactly one ArrayRecord {arrayrecord_key!r}, got {sorted(arrays.keys())}"
    if list(metrics.keys()) != [metricrecord_key]:
        return {}, None, f"expected exactly one MetricRecord {metricrecord_key!r}, got {sorted(metrics.keys())}"
    try:
        state = {k: a.numpy() for k, a in arrays[arrayrecord_key].items()}
    except Exception as err:  # undecodable bytes, bad dtype strings, …
        return {}, None, f"undecodable arrays ({type(err).__name__}: {err})"
    return state, metrics[metricrecord_key].get(weighted_by_key), None


def harmonise_metrics(server_round: int, kept: list[Message], metricrecord_key: str = "metrics") -> list[str]:
    """Keep only the metrics every kept reply reports with the same kind of value.

    Flower's strategies raise on MetricRecords whose keys (or value kinds) differ between
    replies, so one reply with an extra, missing or list-valued metric would otherwise abort
    the round. The models are not affected; the dropped metric names are returned.
    """
    if not kept:
        return []

    def kind(v: Any) -> tuple:
        return ("list", len(v)) if isinstance(v, list) else ("scalar",)

    records = [m.content[metricrecord_key] for m in kept]
    shared = set(records[0].keys()).intersection(*(r.keys() for r in records[1:]))
    keep = {k for k in shared if len({kind(r[k]) for r in records}) == 1}
    dropped = sorted(set().union(*(r.keys() for r in records)) - keep)
    if dropped:
        for m, r in zip(kept, records):
            m.content[metricrecord_key] = MetricRecord({k: v for k, v in r.items() if k in keep})
        log.info("round %d: metrics %s are not reported alike by all kept replies: left out of the aggregate",
                 server_round, dropped)
    return dropped


def like_reference(arrays: ArrayRecord, reference: dict[str, np.ndarray]) -> ArrayRecord:
    """``arrays`` with the reference (global) model's dtypes.

    Inner strategies average integer buffers (BatchNorm's ``num_batches_tracked``) into
    float64; left so, the next round's replies (int64 again) would all fail validation.
    """
    fixed = {}
    for k, a in arrays.items():
        ref = reference.get(k)
        if ref is not None and a.dtype != str(ref.dtype):
            v = a.numpy()
            fixed[k] = Array(np.asarray(np.rint(v) if ref.dtype.kind in "iub" else v, order="C").astype(ref.dtype))
    if not fixed:
        return arrays
    return ArrayRecord({k: fixed.get(k, a) for k, a in arrays.items()})
