"""CLIP-Fed's server-side defence as plain torch: validate → screen (+ trigger reconstruction) →
(aggregate elsewhere) → distil.

:class:`CLIPFedDefense` holds what persists across rounds (the model template, the server dataset
on the device, the cached teacher outputs, the distillation head) and exposes one call per step.
The Flower adapters (:mod:`clipfed_strategy.message_api`, :mod:`clipfed_strategy.legacy_api`)
are thin: they turn replies into :class:`ClientUpdate` objects, call these steps, and aggregate
with whatever inner strategy the user chose. No Flower import here.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from clipfed_strategy.batched_eval import (
    batched_logits_and_features,
    looped_logits_and_features,
    resolve_method,
    stack_states,
)
from clipfed_strategy.config import CLIPFedConfig
from clipfed_strategy.distillation import Distiller, own_logits
from clipfed_strategy.screening import behaviour_scores, screen
from clipfed_strategy.server_dataset import ServerDataset
from clipfed_strategy.trigger_inversion import TriggerBank, invert_trigger
from clipfed_strategy.validation import update_norm, validate_replies

log = logging.getLogger(__name__)


def screening_details(record: Mapping[str, Any]) -> dict[str, float]:
    """The numeric per-client screening values of one record (raw metrics such as ``collapse``,
    their ``z_*`` scores, the suspected ``target``), without the combined score and reason."""
    return {k: float(v) for k, v in record.items()
            if k not in ("score", "reason", "flagged", "weight") and isinstance(v, (int, float))}


@dataclass
class ClientUpdate:
    """One structurally valid reply: a full client model state and its example count."""

    client_id: str
    state: dict[str, np.ndarray]
    num_examples: float


@dataclass
class ScreeningOutcome:
    """Per client (in input order): aggregation weight (0 = dropped), flag, record; possibly clipped states."""

    weights: list[float]
    flagged: list[bool]
    records: list[dict[str, Any]]
    states: list[dict[str, np.ndarray]]
    enforced: bool
    seconds: float
    clip_norm: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    # per client: flagged, then distilled towards the kept clients and aggregated (screen-purify)
    purified: list[bool] = field(default_factory=list)


def teacher_label(identity: str, is_standin: bool) -> str:
    """How every log line and results file names the teacher."""
    if is_standin:
        return f"STAND-IN teacher (small open_clip model trained offline; NOT CLIP): {identity}"
    return f"CLIP teacher: {identity}"


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class CLIPFedDefense:
    """The CLIP-Fed core for one federation.

    Parameters
    ----------
    model : nn.Module
        An instance of the federation's model (any architecture; input float NCHW in [0, 1] at the
        server dataset's resolution). Used as a template; its weights are not changed.
    server_data : ServerDataset
        The server's synthesised dataset (clean rows + frequency-augmented variants).
    teacher_logits : array ``[N, C]``
        The teacher's zero-shot logits for every server-dataset row (cached once per run).
    teacher_embeddings : array ``[N, D]``
        The teacher's L2-normalised image embeddings of every row.
    text_prototypes : array ``[C, D]``
        The teacher's class text prototypes (L2-normalised).
    teacher_info : dict
        ``identity`` and ``is_standin`` of the teacher (reported every round).
    config : CLIPFedConfig
    """

    def __init__(self, model: nn.Module, server_data: ServerDataset, teacher_logits, teacher_embeddings,
                 text_prototypes, teacher_info: Mapping[str, Any], config: CLIPFedConfig | None = None) -> None:
        self.config = config or CLIPFedConfig()
        self.device = resolve_device(self.config.device)
        # How batched screening runs the K models: "auto" = vmap on GPU, one after another on CPU
        # (faster there, see clipfed_strategy/batched_eval.py); "vmap" / "sequential" force one.
        self.eval_method = "auto"
        self.template = copy.deepcopy(model).to(self.device).eval()
        self.student = copy.deepcopy(model).to(self.device)
        self.param_names = list(model.state_dict().keys())
        self.class_names = list(server_data.class_names)
        self.teacher_info = {
            "identity": str(teacher_info.get("identity", "unknown")),
            "is_standin": bool(teacher_info.get("is_standin", False)),
        }
        self.teacher_info["label"] = teacher_label(self.teacher_info["identity"], self.teacher_info["is_standin"])
        self.dataset_hash = server_data.hash
        # The server dataset lives on the device once, for the whole run.
        x, y, variants, src = server_data.to_tensors(self.device)
        self.x, self.y, self.variants, self.src = self._fast_layout(x), y, variants, src
        self.clean_rows = torch.nonzero(variants == 0).flatten()
        self.aug_rows = torch.nonzero(variants > 0).flatten()
        pos = torch.full((len(y),), -1, dtype=torch.long, device=self.device)
        pos[self.clean_rows] = torch.arange(len(self.clean_rows), device=self.device)
        self.aug_source_pos = pos[src[self.aug_rows]]
        self.teacher_logits = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float32, device=self.device)
        self.teacher_emb = torch.as_tensor(np.asarray(teacher_embeddings), dtype=torch.float32, device=self.device)
        self.text_prototypes = F.normalize(
            torch.as_tensor(np.asarray(text_prototypes), dtype=torch.float32, device=self.device), dim=-1
        )
        if self.config.screen.enabled and len(self.aug_rows) == 0:
            raise ValueError(
                "the server dataset has no augmented variants, but screening compares clean and augmented behaviour: "
                "rebuild it with frequency augmentation (faug-ops / `data_synth build --faug-ops`) or set screen-enabled=false"
            )
        if len(self.clean_rows) == 0:
            raise ValueError("the server dataset has no clean rows")
        if self.teacher_logits.shape[0] != len(y):
            raise ValueError(f"teacher outputs cover {self.teacher_logits.shape[0]} rows, the server dataset has {len(y)}")
        self.distiller = Distiller(
            embed_dim=self.text_prototypes.shape[1], head=self.config.distill_head,
            feature_module=self.config.feature_module or None, seed=self.config.seed,
        )
        # Triggers reconstructed from flagged client models (clipfed_strategy/trigger_inversion.py).
        self.bank = TriggerBank(self.config.invert.bank_size)
        # Each client's smoothed screening score (screen-history > 0), by client id.
        self.score_history: dict[str, float] = {}
        # (round, [N, C] mean logits of that round's kept client models) for distill-self-source=ensemble
        self._ensemble: tuple[int, torch.Tensor] | None = None
        self._inversion_models: tuple[nn.Module, nn.Module] | None = None  # (suspect, reference), built on first use
        self._purifier: nn.Module | None = None  # screen-purify's working copy, built on first use
        self._first_aug_group = int(variants.max()) + 1 if len(variants) else 1
        log.info("CLIP-Fed ready on %s: %d server images (%d clean, %d augmented), screening %s, %s", self.device,
                 len(y), len(self.clean_rows), len(self.aug_rows),
                 "vmap-batched" if self.config.screen.batched and resolve_method(self.eval_method, self.device) == "vmap"
                 else "one model at a time", self.teacher_info["label"])

    def _fast_layout(self, x: torch.Tensor) -> torch.Tensor:
        """The server images channels-last on CPU when the model has convolutions and accepts them.

        oneDNN's CPU convolutions run faster on channels-last tensors (small CNN: screening ~2×,
        distillation ~1.4×; ResNet-18 unchanged); values are unchanged, results equal to float
        rounding. A model that cannot take them (e.g. ``.view`` on a conv output) keeps NCHW.
        """
        if self.device.type != "cpu" or x.dim() != 4 or not any(isinstance(m, nn.Conv2d) for m in self.template.modules()):
            return x
        fast = x.contiguous(memory_format=torch.channels_last)
        try:
            with torch.no_grad():
                self.template(fast[:2])
        except RuntimeError as exc:
            log.info("server images stay NCHW: %s fails on channels-last inputs (%s)", type(self.template).__name__,
                     str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            return x
        return fast

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_teacher(cls, model: nn.Module, server_data: ServerDataset, teacher, config: CLIPFedConfig | None = None,
                     cache_dir: str | None = None) -> "CLIPFedDefense":
        """Run (or load from the disk cache) the teacher over the server dataset, then build the core."""
        from clipfed_strategy.teacher_cache import teacher_outputs

        if list(teacher.class_names) != list(server_data.class_names):
            raise ValueError(f"teacher classes {teacher.class_names} differ from the server dataset's {server_data.class_names}")
        out = teacher_outputs(teacher, server_data, cache_dir, server_data.hash)
        log.info("teacher outputs for %d server images %s", len(server_data),
                 "loaded from cache" if out.from_cache else f"computed and cached in {cache_dir}")
        return cls(model, server_data, out.logits, out.embeddings, teacher.text_prototypes.detach().cpu().numpy(),
                   {"identity": teacher.identity, "is_standin": teacher.is_standin}, config)

    # ------------------------------------------------------------------ step 1: validate
    def validate(self, global_state: Mapping[str, np.ndarray], replies: Sequence[tuple[Mapping[str, Any], Any]]) -> list[str | None]:
        """A rejection reason (or ``None``) for each ``(state, num_examples)`` reply."""
        return validate_replies(list(replies), global_state, self.config.validation)

    # ------------------------------------------------------------------ step 2: screen
    @torch.no_grad()
    def client_logits(self, states: Sequence[Mapping[str, np.ndarray]], need_features: bool,
                      x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits ``[K, N, C]`` (and features) of K client models on the whole server dataset (or ``x``)."""
        cfg = self.config.screen
        x = self.x if x is None else x
        per_model = [self._torch_state(s) for s in states]
        feature_module = self.config.feature_module or None
        if cfg.batched and resolve_method(self.eval_method, self.device) == "vmap":
            stacked = stack_states(per_model, device=self.device)
            return batched_logits_and_features(self.template, stacked, x, chunk_size=cfg.chunk_size,
                                               feature_module=feature_module, return_features=need_features)
        # one model at a time (screen-batched = false, or "auto" on CPU where it is the faster way)
        per_model = [{k: v.to(self.device) for k, v in p.items()} for p in per_model]
        return looped_logits_and_features(self.template, per_model, x, feature_module=feature_module,
                                          return_features=need_features)

    def _torch_state(self, state: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A reply's (or the global model's) numpy state as CPU tensors, in the model's key order."""
        return {k: torch.from_numpy(np.asarray(state[k])) for k in self.param_names}

    def _logits_with_probes(self, states: Sequence[Mapping[str, np.ndarray]], need_features: bool,
                            probes) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``client_logits`` on the server rows, then (with ``probes``) on the bank's stamped rows after them."""
        logits, feats = self.client_logits(states, need_features)
        if probes is not None:
            logits = torch.cat([logits, self.client_logits(states, False, x=probes[0])[0]], dim=1)
        return logits, feats

    def screen(self, server_round: int, global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate]) -> ScreeningOutcome:
        """Score every client model's behaviour on the server dataset and decide weights."""
        t0 = time.perf_counter()
        cfg = self.config.screen
        n = [float(u.num_examples) for u in updates]
        states = [u.state for u in updates]
        self._ensemble = None
        if not cfg.enabled or not updates:
            if updates and self._wants_ensemble():
                self._remember_ensemble(server_round, self.client_logits(states, False)[0], n)
            return ScreeningOutcome(n, [False] * len(updates), [{} for _ in updates], states, False, time.perf_counter() - t0)
        need_feats = cfg.w_proto > 0
        probes = self._bank_probes() if self.config.invert.enabled and self.config.invert.screen else None
        logits, feats = self._logits_with_probes(states, need_feats, probes)
        # A model with NaN/Inf outputs on the server set (e.g. negative BatchNorm variances) is broken
        # whatever the statistics say; its scores would also turn every robust z-score into NaN.
        finite = torch.isfinite(logits).flatten(1).all(1)
        if feats is not None:
            finite &= torch.isfinite(feats).flatten(1).all(1)
        ok = [int(i) for i in torch.nonzero(finite).flatten()]
        weights = [0.0] * len(updates)
        flagged = [True] * len(updates)
        records: list[dict[str, Any]] = [{"flagged": True, "weight": 0.0,
                                          "reason": "non-finite outputs (NaN/Inf) on the server dataset"}
                                         for _ in updates]
        enforced = False
        if ok:
            scores = self._scores(logits[ok], None if feats is None else feats[ok], probes)
            reference = None
            if cfg.rule == "threshold":
                g_logits, g_feats = self._logits_with_probes([global_state], need_feats, probes)
                reference = {m: v[0] for m, v in self._scores(g_logits, g_feats, probes).items()}
            prior = [self.score_history.get(updates[i].client_id) for i in ok] if cfg.history > 0 else None
            z_thr = cfg.warmup_z_thr if server_round <= cfg.warmup_rounds else cfg.z_thr
            decision = screen(
                scores, cfg.weights, rule=cfg.rule, mode=cfg.mode, reference=reference, prior=prior, history=cfg.history,
                combine_how=cfg.combine, min_scale={"collapse": cfg.collapse_min_scale},
                z_thr=z_thr, gap=cfg.gap, abs_thr=cfg.abs_thr, max_reject_frac=cfg.max_reject_frac,
                min_kept=cfg.min_kept, min_clients=cfg.min_clients, soft_beta=cfg.soft_beta,
                num_examples=[n[i] for i in ok], min_collapse=cfg.min_collapse, class_names=self.class_names,
            )
            for j, (i, rec) in enumerate(zip(ok, decision.records())):
                weights[i], flagged[i], records[i] = float(decision.weights[j]), bool(decision.flagged[j]), rec
                if cfg.history > 0:
                    self.score_history[updates[i].client_id] = float(decision.combined[j])
            enforced = decision.enforced
        if len(ok) < len(updates):
            log.warning("round %d: %d client model(s) give non-finite outputs on the server dataset: dropped",
                        server_round, len(updates) - len(ok))
        if self._wants_ensemble():
            self._remember_ensemble(server_round, logits, weights)
        info: dict[str, Any] = {}
        if self.config.invert.enabled and enforced:
            info["inversion"] = self.reconstruct_triggers(server_round, global_state, updates, records, ok)
        purified = [False] * len(updates)
        if cfg.purify and enforced:
            states = list(states)
            info["purify"] = self.purify_flagged(server_round, logits, states, weights, records, ok, n, purified)
        clip_to = None
        if cfg.clip_norm == "median":
            states, clip_to = clip_to_median_norm(states, global_state, [w > 0 for w in weights])
        return ScreeningOutcome(weights, flagged, records, states, enforced, time.perf_counter() - t0, clip_to, info,
                                purified)

    def purify_flagged(self, server_round: int, logits: torch.Tensor, states: list[dict[str, np.ndarray]],
                       weights: list[float], records: list[dict[str, Any]], finite: Sequence[int],
                       num_examples: Sequence[float], purified: list[bool]) -> dict[str, Any]:
        """``screen-purify``: distil each dropped (flagged, finite) client model on the server dataset
        towards the kept client models' mean answers and the teacher, then give it back
        ``screen-purify-weight`` × its example count in the aggregation (in place on ``states``,
        ``weights``, ``records``, ``purified``).

        A dropped attacker also takes the clean part of its local training out of the round; on
        CIFAR-10 leaving the two attackers' partitions out costs up to 3 accuracy points even with a
        perfect filter (benchmarks/README.md, "Session 6"/"Session 7"). Purification keeps what the
        model learned where its answers agree with the kept clients' and overwrites its answers on
        the server rows and their trigger-like variants, where a backdoor shows. The anchor is the
        kept models' mean logits on each row's clean source, gated like the post-aggregation
        self-anchor (``distill-self-gate``); no prototype loss (the persistent head is not touched).
        A model that comes out non-finite stays dropped.
        """
        cfg = self.config.screen
        t0 = time.perf_counter()
        kept = sum(1 for v in weights if v > 0)
        anchor = self._kept_mean_logits(logits, weights)
        targets = [i for i in finite if weights[i] <= 0 and records[i].get("flagged")]
        if anchor is None or not targets:
            return {"clients": [], "seconds": time.perf_counter() - t0}
        rows = self._distill_rows()
        source_rows, teacher_rows = self._row_targets(rows)
        base = self.config.distill
        dcfg = dataclasses.replace(base, lambda_pcl=0.0, seed=base.seed + 7 * server_round + 1,
                                   steps=cfg.purify_steps if cfg.purify_steps > 0 else base.steps)
        if self._purifier is None:
            self._purifier = copy.deepcopy(self.template)
        out = []
        for i in targets:
            self._purifier.load_state_dict({k: v.to(self.device) for k, v in self._torch_state(states[i]).items()})
            stats = self.distiller.distill(self._purifier, self.x[rows], self.y[source_rows], self.teacher_logits[teacher_rows],
                                           None, dcfg, self_logits=anchor[source_rows])
            new = {k: v.detach().cpu().numpy().astype(np.asarray(states[i][k]).dtype, copy=True)
                   for k, v in self._purifier.state_dict().items()}
            ok = all(np.isfinite(v).all() for v in new.values() if v.dtype.kind == "f")
            if ok:
                states[i] = new
                weights[i] = float(num_examples[i]) * cfg.purify_weight
                purified[i] = True
                records[i] = {**records[i], "weight": weights[i], "purified": True}
            out.append({"index": i, "purified": ok, "loss": stats.get("total")})
        log.info("round %d: purified %d flagged client model(s) by distillation towards the %d kept ones (%.1fs)",
                 server_round, sum(o["purified"] for o in out), kept, time.perf_counter() - t0)
        return {"clients": out, "seconds": time.perf_counter() - t0}

    def _wants_ensemble(self) -> bool:
        c = self.config
        return c.distill_self_source == "ensemble" and c.distill_enabled and c.distill.lambda_self > 0

    def _kept_mean_logits(self, logits: torch.Tensor, weights: Sequence[float]) -> torch.Tensor | None:
        """The mean logits ``[N, C]`` of the kept client models (weight > 0) on every server row, weighted
        by their screening weights (example counts; soft-mode weights); ``None`` when none was kept.
        Dropped and non-finite models have weight 0."""
        w = torch.as_tensor([float(v) for v in weights], dtype=torch.float32, device=logits.device)
        keep = torch.nonzero(w > 0).flatten()
        if len(keep) == 0:
            return None
        w = w[keep] / w[keep].sum()
        return torch.einsum("k,knc->nc", w, logits[keep, : len(self.y)].float())

    def _remember_ensemble(self, server_round: int, logits: torch.Tensor, weights: Sequence[float]) -> None:
        """Keep the round's kept-client mean logits for ``distill-self-source="ensemble"``."""
        mean = self._kept_mean_logits(logits, weights)
        if mean is not None:
            self._ensemble = (server_round, mean)

    def ensemble_logits(self, server_round: int) -> torch.Tensor | None:
        """The kept clients' mean logits ``[N, C]`` on the server rows remembered by this round's
        :meth:`screen`, or ``None`` when that round kept no client or was not screened here."""
        ens = self._ensemble
        return ens[1] if ens is not None and ens[0] == server_round else None

    # ------------------------------------------------------------------ step 2b: reconstruct triggers
    def reconstruct_triggers(self, server_round: int, global_state: Mapping[str, np.ndarray], updates: Sequence[ClientUpdate],
                             records: Sequence[Mapping[str, Any]], finite: Sequence[int]) -> dict[str, Any]:
        """Invert the trigger of up to ``invert-max-per-round`` flagged client models (most suspicious
        first) towards their suspected target class, with the round's global model as the reference
        that must not flip; keep those that pass ``invert-min-flip`` in the bank."""
        icfg = self.config.invert
        t0 = time.perf_counter()
        candidates = sorted((i for i in finite if records[i].get("flagged") and "target" in records[i]),
                            key=lambda i: -float(records[i].get("score", 0.0)))[: icfg.max_per_round]
        xc, yc = self.x[self.clean_rows], self.y[self.clean_rows]
        if self._inversion_models is None:
            self._inversion_models = (copy.deepcopy(self.template).eval(), copy.deepcopy(self.template).eval())
        suspect, reference = self._inversion_models
        reference.load_state_dict(self._torch_state(global_state))
        results = []
        for i in candidates:
            target = int(records[i]["target"])
            suspect.load_state_dict(self._torch_state(updates[i].state))
            try:
                trig = invert_trigger(suspect, xc, yc, target, icfg, seed=self.config.seed * 7919 + server_round * 31 + len(results),
                                      reference=reference)
            except ValueError as err:  # e.g. every clean row belongs to the target class
                results.append({"client": updates[i].client_id, "target": target, "kept": False, "reason": str(err)})
                continue
            keep = trig.flip_rate - trig.ref_flip_rate >= icfg.min_flip
            trig.round, trig.client = server_round, updates[i].client_id
            if keep:
                self.bank.add(trig)
            results.append({"client": updates[i].client_id, "target": target, "flip_rate": trig.flip_rate,
                            "ref_flip_rate": trig.ref_flip_rate, "mask_mean": trig.mask_mean, "kept": keep})
            log.info("round %d: trigger reconstructed from flagged client %s → class %d (%s): flips %.0f%% of clean "
                     "server rows on that model, %.0f%% on the global model, mask %.3f of the image; %s", server_round,
                     updates[i].client_id, target, self.class_names[target], 100 * trig.flip_rate,
                     100 * trig.ref_flip_rate, trig.mask_mean,
                     f"banked ({len(self.bank)} in the bank)" if keep else f"gap below invert-min-flip {icfg.min_flip}: not kept")
        return {"triggers": results, "bank_size": len(self.bank), "seconds": time.perf_counter() - t0}

    def _bank_probes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """Clean server rows stamped with each banked trigger: (images, clean-row positions, trigger index)."""
        if not len(self.bank):
            return None
        icfg = self.config.invert
        return self.bank.stamped_rows(self.x[self.clean_rows], self.y[self.clean_rows], icfg.rows_per_trigger,
                                      seed=self.config.seed)

    def _scores(self, logits: torch.Tensor, feats: torch.Tensor | None, probes=None) -> dict[str, torch.Tensor]:
        """Scores from logits over the server rows (then, with ``probes``, over the bank's stamped rows)."""
        cfg = self.config.screen
        c, a = self.clean_rows, self.aug_rows
        aug_logits, aug_y = logits[:, a], self.y[a]
        aug_src_rows, aug_pos, aug_groups = self.src[a], self.aug_source_pos, self.variants[a]
        if probes is not None:  # each banked trigger is one more probe group, paired with its clean sources
            n = len(self.y)
            _, pos, which = probes
            aug_logits = torch.cat([aug_logits, logits[:, n:]], dim=1)
            aug_y = torch.cat([aug_y, self.y[c][pos]])
            aug_src_rows = torch.cat([aug_src_rows, c[pos]])
            aug_pos = torch.cat([aug_pos, pos])
            aug_groups = torch.cat([aug_groups, self._first_aug_group + which])
        return behaviour_scores(
            logits[:, c], self.y[c], aug_logits, aug_y,
            teacher_logits_clean=self.teacher_logits[c],
            teacher_logits_for_aug=self.teacher_logits[aug_src_rows],
            client_feats_clean=None if feats is None else feats[:, c],
            T=cfg.T, soft=cfg.soft_collapse, soft_bias=cfg.soft_bias, aug_source=aug_pos, aug_groups=aug_groups,
            reference=cfg.collapse_ref,
        )

    # ------------------------------------------------------------------ step 3: distil
    def should_distill(self, server_round: int) -> bool:
        c = self.config
        return c.distill_enabled and server_round >= c.distill_start_round and (server_round - c.distill_start_round) % c.distill_every == 0

    def distill(self, server_round: int, state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """Distil the aggregated model towards the teacher; returns the new state (CPU) and loss stats."""
        if not self.should_distill(server_round):
            return dict(state), {}
        rows = self._distill_rows()
        x = self.x[rows]
        source_rows, teacher_rows = self._row_targets(rows)
        probes = self._bank_probes() if self.config.invert.enabled else None
        if probes is not None:  # banked triggers stamped on clean rows; the targets are those of the clean source
            x = torch.cat([x, probes[0].to(x.dtype)])
            source_rows = torch.cat([source_rows, self.clean_rows[probes[1]]])
            teacher_rows = torch.cat([teacher_rows, self.clean_rows[probes[1]]])
        self.student.load_state_dict({k: v.to(self.device) for k, v in state.items()})
        dcfg = dataclasses.replace(self.config.distill, seed=self.config.distill.seed + server_round)
        self_logits, from_ensemble = None, False
        if dcfg.lambda_self > 0:
            if self.config.distill_self_source == "ensemble":
                ens = self.ensemble_logits(server_round)
                if ens is None:
                    log.warning("round %d: distill-self-source=ensemble, but no client model of this round was kept "
                                "or screened here: the self-anchor uses the aggregated model's own predictions",
                                server_round)
                else:
                    self_logits, from_ensemble = ens[source_rows], True
            if self_logits is None:
                self_logits = own_logits(self.student, self.x, source_rows)
        stats = self.distiller.distill(self.student, x, self.y[source_rows], self.teacher_logits[teacher_rows],
                                       self.prototypes(), dcfg, self_logits=self_logits)
        if probes is not None:
            stats["trigger_rows"] = float(len(probes[0]))
        if dcfg.lambda_self > 0:
            stats["self_from_ensemble"] = float(from_ensemble)
        new_state = {k: v.detach().cpu().clone() for k, v in self.student.state_dict().items()}
        if not all(bool(torch.isfinite(v).all()) for v in new_state.values() if v.is_floating_point()):
            log.warning("round %d: distillation produced non-finite weights (loss %s): keeping the aggregated model",
                        server_round, stats.get("total"))
            return dict(state), {**stats, "non_finite": 1.0}
        return new_state, stats

    def _row_targets(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For distillation rows: each row's clean source row, and the row whose teacher output is its
        target (the clean source, or the row itself with ``distill-teacher-input="aug"``)."""
        source_rows = self.src[rows]
        return source_rows, source_rows if self.config.distill_teacher_input == "clean" else rows

    def _distill_rows(self) -> torch.Tensor:
        which = self.config.distill_data
        if which == "clean":
            return self.clean_rows
        if which == "aug":
            return self.aug_rows
        return torch.arange(len(self.y), device=self.device)

    def prototypes(self) -> torch.Tensor:
        """Class prototypes for the prototype contrastive loss (``distill-proto``)."""
        kind = self.config.distill_proto
        if kind == "text":
            return self.text_prototypes
        c = self.clean_rows
        image = torch.stack([
            F.normalize(self.teacher_emb[c][self.y[c] == k].mean(0), dim=0) if bool((self.y[c] == k).any())
            else self.text_prototypes[k]
            for k in range(len(self.class_names))
        ])
        return image if kind == "image" else F.normalize(image + self.text_prototypes, dim=-1)

    # ------------------------------------------------------------------ persistence
    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to resume: the projection head, the trigger bank, the score history."""
        return {"head": self.distiller.state_dict(), "triggers": self.bank.state_dict(),
                "score_history": dict(self.score_history)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("head"):
            self.distiller.load_state_dict(state["head"])
        if state.get("triggers"):
            self.bank.load_state_dict(state["triggers"])
        if state.get("score_history"):
            self.score_history = {str(k): float(v) for k, v in state["score_history"].items()}


def clip_to_median_norm(states: Sequence[dict[str, np.ndarray]], global_state: Mapping[str, np.ndarray],
                        kept: Sequence[bool]) -> tuple[list[dict[str, np.ndarray]], float | None]:
    """Clip every update w_i − w_t (float, non-BN-statistics entries) to the kept clients' median norm."""
    norms = [update_norm(s, global_state) for s in states]
    kept_norms = [nrm for nrm, k in zip(norms, kept) if k]
    if not kept_norms:
        return list(states), None
    limit = float(np.median(kept_norms))
    out = []
    for s, nrm in zip(states, norms):
        if nrm <= limit or nrm == 0:
            out.append(s)
            continue
        scale = limit / nrm
        out.append({
            k: (global_state[k] + (v - global_state[k]) * scale).astype(v.dtype)
            if v.dtype.kind == "f" and "running_" not in k else v
            for k, v in s.items()
        })
    return out, limit
