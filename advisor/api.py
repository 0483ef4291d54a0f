"""The Python API: ``plan`` (budget planning, no quantization) and ``recommend`` (the main job).

Data flow (docs/ARCHITECTURE.md): load -> windows -> baseline -> probe -> grid -> predict -> rank
-> (recommend only) execute the cheapest candidate predicted to pass, measure it packed, escalate on
a miss -> report. Every measurement is written to the store, so each verification improves the next fit.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from advisor.protocol import Protocol
from advisor.store import Store, open_store
from advisor.models.errors import AdvisorError


# Coverage of the interval whose upper bound a candidate must meet to be chosen (plan, recommend's
# first attempt and escalations). At 0.9 the first attempt passed in every case of
# benchmarks/recommend.py, but the choice was often a spec 0.4-1 bit wider than needed (agreement with
# the brute-force cheapest 0.54): 90% upper bounds of milli-nat losses rarely fit a 1% budget, which
# is why recommend then explores cheaper, plausible candidates (see recommend()).
DECISION_CONFIDENCE = 0.9


@dataclass(frozen=True)
class Budget:
    """A quality budget: a perplexity one as the largest allowed dL = ln(ppl_q / ppl_fp), or a KL one as
    the largest allowed mean KL divergence from the baseline (``metric == "kld"``, nats per token)."""

    max_dl: float  # the limit in the budget's metric: dL for a perplexity budget, mean KL for a KL one
    description: str
    metric: str = "dl"  # "dl" or "kld"

    @classmethod
    def from_args(cls, baseline_ppl: float, max_ppl_delta: float | None = None,
                  max_ppl_ratio: float | None = None, max_kld: float | None = None) -> "Budget":
        if sum(x is not None for x in (max_ppl_delta, max_ppl_ratio, max_kld)) != 1:
            raise AdvisorError("give exactly one budget: --max-ppl-delta X (absolute perplexity increase), "
                               "--max-ppl-ratio R (ppl_q / ppl_fp, e.g. 1.03) or --max-kld K (mean KL "
                               "divergence from the baseline, nats per token)")
        if max_kld is not None:
            if not (isinstance(max_kld, (int, float)) and math.isfinite(max_kld) and max_kld > 0):
                raise AdvisorError(f"--max-kld must be a positive number, got {max_kld}")
            return cls(float(max_kld), f"mean KL <= {max_kld:g}", "kld")
        if max_ppl_delta is not None:
            if not (isinstance(max_ppl_delta, (int, float)) and math.isfinite(max_ppl_delta) and max_ppl_delta > 0):
                raise AdvisorError(f"--max-ppl-delta must be a positive number, got {max_ppl_delta}")
            return cls(math.log1p(max_ppl_delta / baseline_ppl), f"dPPL <= {max_ppl_delta:g}")
        if not (math.isfinite(max_ppl_ratio) and max_ppl_ratio > 1):
            raise AdvisorError(f"--max-ppl-ratio must be a number above 1, got {max_ppl_ratio}")
        return cls(math.log(max_ppl_ratio), f"ppl ratio <= {max_ppl_ratio:g}")

    def dppl(self, baseline_ppl: float) -> float | None:
        """The budget as an absolute dPPL (None for a KL budget: it has none)."""
        return None if self.metric == "kld" else baseline_ppl * math.expm1(self.max_dl)


@dataclass
class Context:
    """A loaded model with its protocol, windows, baseline and features: what plan, recommend and sweeps share."""

    loaded: Any
    eval: Any
    calib: Any
    baseline_ppl: float
    baseline_nll: float
    features: dict[str, float]
    provenance: dict[str, Any]
    store: Store
    protocol: Protocol = field(default_factory=Protocol)
    reference: Any = None  # models.evaluate.Reference of the baseline, kept once a candidate is verified
    extension: Any = None  # models.data.Windows after the evaluation windows (sequential test), cut on first use
    progress: bool = False  # print the probes' cost estimate and progress (stderr)
    # format keys whose RTN loss this context measured because no stored measurement existed
    rtn_loss_on_demand: list[str] = field(default_factory=list)


def prepare(model: str | Any, protocol: Protocol | None = None, *, device: str | None = None,
            model_options: Any = None, store: Store | str | None = None, progress: bool = True,
            probes: bool = True, job: str = "predict", specs: list[str] | None = None,
            check_loaded: Any = None, **protocol_fields: Any) -> Context:
    """Load (if a name), cut the protocol's windows, measure or reuse the baseline and the probes that the
    candidates ``specs`` need (None: the default grid's); with ``progress``, the probes' cost estimate
    and ETA first.

    ``protocol``: a :class:`advisor.protocol.Protocol`; its fields may also be given as keywords
    (``seq_len=256``, ``bos="never"``), alone or replacing some of ``protocol``'s. ``model_options``: a
    ``models.loading.ModelOptions`` (device, dtype, remote code); ``device`` replaces its device. Without
    either the model loads on the CPU in float32. ``probes=False`` skips the probes (sweeps run them
    through their ``on_model`` hook). ``job`` names the work for the loader's memory preflight.
    ``check_loaded(loaded)`` runs right after loading, before any measurement (it raises to refuse)."""
    from advisor.probing import probe_features, probe_keys
    from advisor.models.evaluate import perplexity
    from advisor.models.loading import load

    protocol = Protocol.from_kwargs(protocol, **protocol_fields)
    if store is None or isinstance(store, (str, os.PathLike)):  # else a Store, or a sweep worker's stand-in
        store = open_store(store)
    if isinstance(model, str):
        loaded = load(model, device=device, options=model_options, job=job,
                      job_params={"seq_len": protocol.seq_len, "n_calib": protocol.n_calib})
    else:
        loaded = model
    if check_loaded is not None:
        check_loaded(loaded)
    ev, cal = protocol.windows(loaded)
    fp = loaded.source.fingerprint
    store.add_model(fp, loaded.source.name, family=loaded.family, source_kind=loaded.source.kind,
                    n_params=loaded.n_params(), non_embedding_params=loaded.n_params(non_embedding=True),
                    info=loaded.source.to_dict())
    base = store.baseline(fp, ev.protocol)
    if base is None:
        r = perplexity(loaded.model, ev, batch_size=protocol.batch_size, progress=progress, desc="baseline")
        store.add_baseline(fp, ev.protocol, r.ppl, r.nll, r.n_tokens, r.seconds)
        base = store.baseline(fp, ev.protocol)
    features, provenance = {}, {}
    if probes:
        features, provenance = probe_features(loaded, protocol.probe_windows(loaded, exclude=ev), store=store,
                                              seed=protocol.seed, loss_windows=cal, keys=probe_keys(specs),
                                              progress=progress,
                                              seconds_per_token=(base["seconds"] or 0) / max(1, base["n_tokens"]))
    measured_now = provenance.get("probes", {}).get("rtn_loss", {}).get("run", [])
    return Context(loaded, ev, cal, float(base["ppl"]), float(base["nll"]), features, provenance, store, protocol,
                   progress=progress, rtn_loss_on_demand=list(measured_now))


def _format_features_missing(features: dict[str, float], keys: list[str]) -> list[str]:
    """The format keys of ``keys`` whose features a prediction needs but ``features`` lacks."""
    from advisor.features import KNEE_KEY

    need = lambda k: (f"second_order.{k}", f"sqnr.{k}_db", f"rtn_loss.{k}")  # noqa: E731
    return [k for k in keys if KNEE_KEY not in features or any(n not in features for n in need(k))]


def measure_formats(ctx: Context, specs: list[str]) -> list[str]:
    """Measure (or read from the store) the probe features of every format of ``specs`` that ``ctx`` lacks:
    the RTN loss with the same ``rtn_loss`` probe on the same windows as every other format, cached in the
    same store. Adds them to ``ctx.features``; returns the format keys whose RTN loss was measured now."""
    from advisor.probing import probe_features, probe_keys

    missing = _format_features_missing(ctx.features, probe_keys(specs))
    if not missing:
        return []
    features, provenance = probe_features(ctx.loaded, ctx.protocol.probe_windows(ctx.loaded, exclude=ctx.eval),
                                          store=ctx.store, seed=ctx.protocol.seed, loss_windows=ctx.calib,
                                          keys=missing, progress=ctx.progress)
    ctx.features.update(features)
    measured_now = provenance.get("probes", {}).get("rtn_loss", {}).get("run", [])
    run = [k for k in measured_now if k not in ctx.rtn_loss_on_demand]
    ctx.rtn_loss_on_demand.extend(run)
    return run


def measured_neighbours(ctx: Context, specs: list[str]) -> tuple[list[str], dict[str, float]]:
    """Specs ordered against some of ``specs`` (``advisor.orderings``: the same method, a finer or coarser
    format) whose RTN loss is measured, in ``ctx.features`` or stored; (those specs, their features)."""
    from advisor.candidates import all_formats
    from advisor.orderings import finer_or_equal
    from advisor.probes import feature_key
    from advisor.probing import cached_format_features
    from advisor.quantizers import QuantSpec

    wanted = [QuantSpec.parse(s) for s in specs]
    groups = sorted({q.group_size for q in wanted if q.group_size is not None})
    candidates: dict[str, QuantSpec] = {}
    for q in wanted:
        for dtype, group in all_formats(extra_group_sizes=groups):
            try:
                n = QuantSpec(q.method, dtype, group, q.symmetric, q.options)
            except ValueError:  # the method does not take this data type
                continue
            if n != q and str(n) not in specs and (finer_or_equal(n, q) or finer_or_equal(q, n)):
                candidates.setdefault(str(n), n)
    keys = {s: feature_key(n) for s, n in candidates.items()}
    known = {k for k in keys.values() if not _format_features_missing(ctx.features, [k])}
    stored = cached_format_features(ctx.loaded, ctx.protocol.probe_windows(ctx.loaded, exclude=ctx.eval), ctx.store,
                                    ctx.protocol.seed, ctx.calib, [k for k in dict.fromkeys(keys.values())
                                                                    if k not in known])
    features = {**stored, **ctx.features}
    return [s for s, k in keys.items() if not _format_features_missing(features, [k])], features


def _check_request(confidence: float, max_bytes: int | None) -> None:
    """The arguments plan and recommend share, refused before any work."""
    if not (0.5 <= confidence < 1):
        raise AdvisorError(f"--confidence must be in [0.5, 1), got {confidence}")
    if max_bytes is not None and not (max_bytes > 0):
        raise AdvisorError(f"max_bytes must be positive, got {max_bytes}")


def nearest_miss(df: pd.DataFrame, description: str, confidence: float, where: str = "") -> str:
    """Why nothing in ``df`` passes: the budget, and the candidate with the lowest predicted upper bound.
    ``where`` qualifies the candidates considered, e.g. " among those that fit"."""
    best = df.loc[df["pred_dl_upper"].idxmin()]
    return (f"no candidate{where} is predicted to meet {description} at {confidence:.0%} confidence; the best "
            f"achievable{where} is {best['spec']} with predicted dPPL {best['pred_dppl']:.4f} "
            f"(upper {best['pred_dppl_upper']:.4f}) at {best['bits_per_weight']:.2f} bits/weight")


def predict_candidates(ctx: Context, specs: list[str] | None = None, confidence: float = 0.9,
                       predictor=None, measure_missing: bool = True) -> pd.DataFrame:
    """Every candidate with its cost and predicted dL / dPPL interval, cheapest first.

    A candidate whose format has no measured RTN loss gets one now (``measure_formats``), unless
    ``measure_missing`` is False (then its physics is the second-order estimate: ``estimated_physics``).
    The predictions are made consistent with the orderings that hold for RTN (``advisor.orderings``) over
    the candidates and their measured neighbours (stored measurements of finer or coarser formats).

    Columns beyond the candidate's cost: ``pred_dl``/``pred_dppl`` with ``_lower``/``_upper``,
    ``method_gain_extrapolated``, ``rtn_dl``/``rtn_dl_se`` (the measured RTN loss of the format, NaN where
    none), ``rtn_loss_on_demand`` (measured for this request: no stored measurement existed),
    ``estimated_physics`` (no RTN loss measured: the second-order estimate stands in, and the interval
    covers the measured neighbours). ``df.attrs``: ``predictor`` (the predictor's ``describe()``),
    ``outside_fitted_range`` (the model's scale terms outside the fitted range, ``{}`` inside),
    ``rtn_loss_on_demand`` (the format keys measured for this context), ``neighbours`` (the measured
    specs the orderings were enforced against)."""
    from advisor.candidates import enumerate_candidates, order_by_cost_then_quality
    from advisor.features import feature_rows
    from advisor.fitting import load_default_predictor
    from advisor.orderings import consistent
    from advisor.probes import feature_key

    predictor = predictor or load_default_predictor()
    cands = enumerate_candidates(ctx.loaded, specs)
    wanted = [c.spec for c in cands]
    if measure_missing:
        measure_formats(ctx, wanted)
    neighbours, features = measured_neighbours(ctx, wanted)
    together = wanted + neighbours
    rows = feature_rows(features, together, non_embedding_params=ctx.loaded.n_params(True),
                        baseline_nll=ctx.baseline_nll)
    mean, lower, upper = predictor.predict_interval(rows, alpha=1 - confidence)
    estimated = predictor.estimated_physics(rows)
    mean, lower, upper = consistent(together, mean, lower, upper, predictor.predictive_variance(rows), estimated)
    n = len(wanted)
    rows = rows.iloc[:n].reset_index(drop=True)
    mean, lower, upper = mean[:n], lower[:n], upper[:n]
    df = pd.DataFrame([c.to_dict() for c in cands])
    df["pred_dl"], df["pred_dl_lower"], df["pred_dl_upper"] = mean, lower, upper
    # the method's gain over RTN is extrapolated beyond the losses it was fitted on (docs/predictor.md)
    df["method_gain_extrapolated"] = predictor.extrapolated_methods(rows)
    df["rtn_dl"], df["rtn_dl_se"] = rows["rtn_dl"].to_numpy(float), rows["rtn_dl_se"].to_numpy(float)
    df["rtn_loss_on_demand"] = [feature_key(s) in ctx.rtn_loss_on_demand for s in wanted]
    df["estimated_physics"] = estimated[:n]
    bp = ctx.baseline_ppl
    df["pred_dppl"] = bp * np.expm1(mean)
    df["pred_dppl_lower"] = bp * np.expm1(lower)
    df["pred_dppl_upper"] = bp * np.expm1(upper)
    df.attrs["predictor"] = predictor.describe()  # which predictor made these numbers (reports cite it)
    df.attrs["outside_fitted_range"] = predictor.outside_fitted_range(rows)  # the model's scale vs the fit's
    df.attrs["rtn_loss_on_demand"] = list(ctx.rtn_loss_on_demand)
    df.attrs["neighbours"] = neighbours
    return order_by_cost_then_quality(df)  # at equal cost, the better predicted quality first


def plan(model: str | Any, max_ppl_delta: float | None = None, max_bytes: int | None = None, *,
         max_ppl_ratio: float | None = None, confidence: float = DECISION_CONFIDENCE, methods: list[str] | None = None,
         dtypes: list[str] | None = None, specs: list[str] | None = None, predictor=None,
         **prepare_kwargs: Any) -> pd.DataFrame:
    """Budget planning without quantizing anything.

    Returns a DataFrame of every candidate (spec, bits per weight, bytes, relative speed, predicted dL and
    dPPL with interval). With a perplexity budget, ``passes`` marks candidates whose interval upper
    bound meets it and ``chosen`` the cheapest of them. With ``max_bytes`` (the inverse question),
    ``fits`` marks candidates within the memory budget and ``chosen`` the best predicted quality among them
    (among those that also pass, when both budgets are given). ``df.attrs``: ``baseline_ppl``, ``predictor``
    and ``budget`` (``confidence``, ``max_bytes``, and with a perplexity budget ``description`` and
    ``max_ppl_delta``).
    """

    _check_request(confidence, max_bytes)
    ppl_budget = max_ppl_delta is not None or max_ppl_ratio is not None
    if ppl_budget:
        Budget.from_args(1.0, max_ppl_delta, max_ppl_ratio)  # validate the numbers before any work
    requested = specs is not None
    specs = _specs(specs, methods, dtypes)
    ctx = prepare(model, specs=specs, **prepare_kwargs)
    df = predict_candidates(ctx, specs, confidence, predictor)
    df.attrs["requested"] = list(specs) if requested else []  # the user's own list: every one is shown
    df.attrs["baseline_ppl"] = ctx.baseline_ppl
    df.attrs["protocol"] = {"eval": ctx.eval.protocol, "calibration": ctx.calib.protocol}
    df.attrs["budget"] = {"confidence": confidence, "max_bytes": max_bytes}
    df["chosen"] = False
    if ppl_budget:
        budget = Budget.from_args(ctx.baseline_ppl, max_ppl_delta, max_ppl_ratio)
        df.attrs["budget"].update(description=budget.description, max_ppl_delta=budget.dppl(ctx.baseline_ppl))
        df["passes"] = df["pred_dl_upper"] <= budget.max_dl
        if df["passes"].any():
            df.loc[df.index[df["passes"]][0], "chosen"] = True
    if max_bytes is not None:
        df["fits"] = df["bytes"] <= max_bytes
        ok = df[df["fits"] & df.get("passes", True)]
        df["chosen"] = False  # both budgets: the best predicted quality among those that meet both
        if len(ok):
            df.loc[ok["pred_dl"].idxmin(), "chosen"] = True
    return df


@dataclass(frozen=True)
class Attempt:
    spec: str
    predicted: dict[str, float]  # dPPL mean, lower, upper
    measured_ppl_delta: float
    measured_dl: float
    bits_per_weight: float
    seconds: float
    passed: bool
    reason: str = "first choice"  # first choice | escalation (previous missed) | cheaper (after a pass)
    bytes: int | None = None
    dl_se: float | None = None  # paired standard error of measured_dl over the evaluation windows
    kld: dict[str, Any] | None = None  # KL statistics against the baseline (models.evaluate.KLStats)
    n_windows: int | None = None  # evaluation windows measured (the sequential test may stop early or go on)
    verdict: str | None = None  # the sequential test's: pass | miss | inconclusive (advisor.sequential)
    looks: tuple[dict[str, Any], ...] = ()  # per look: n_windows, estimate, se, lower, upper, verdict

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        d["looks"] = [dict(x) for x in self.looks]
        return d


@dataclass(frozen=True)
class Recommendation:
    spec: str | None
    verified: bool
    baseline_ppl: float
    budget: str
    max_ppl_delta: float | None  # the budget as an absolute dPPL (None for a KL budget)
    measured_ppl_delta: float | None
    predicted: dict[str, float] | None
    attempts: tuple[Attempt, ...]
    candidates: tuple[dict[str, Any], ...]
    features: dict[str, float]
    protocol: dict[str, Any]
    provenance: dict[str, Any]
    saved_to: str | None = None
    exit_code: int = 0
    message: str = ""
    seconds: float = 0.0

    confidence: float | None = None
    budget_metric: str = "dl"  # what the budget limits: dl (perplexity budgets) or kld (--max-kld)
    max_kld: float | None = None  # the KL budget (nats per token), for --max-kld
    kld_source: str | None = None  # "measured" under a KL budget: KL is measured, never predicted
    early_stop: bool = True  # the sequential test could decide before the protocol's last window
    export: dict[str, Any] | None = None  # --verify-export: the exported artifact re-measured in its loader

    def to_dict(self) -> dict[str, Any]:
        from advisor.jsonio import document

        d = dict(self.__dict__)
        d["attempts"] = [a.to_dict() for a in self.attempts]
        d["candidates"] = list(self.candidates)
        return document(d, confidence=self.confidence, eval_protocol=self.protocol.get("eval"),
                        calibration=self.protocol.get("calibration"))


def _specs(specs: list[str] | None, methods: list[str] | None, dtypes: list[str] | None) -> list[str]:
    """The candidate grid: explicit ``specs`` (validated; any format, on the default grid or not), else the
    default grid filtered by methods/dtypes."""
    from advisor.candidates import default_specs
    from advisor.quantizers import QuantSpec

    if specs is None:
        return default_specs(methods, dtypes)
    if methods or dtypes:
        raise AdvisorError("give either a candidate list (--specs) or --methods/--dtypes to filter the default grid, "
                           "not both")
    if not specs:
        raise AdvisorError("the candidate list is empty; give at least one spec such as gptq:int4:g128")
    out = []
    for s in specs:
        try:
            out.append(str(QuantSpec.parse(s)))
        except ValueError as e:
            raise AdvisorError(f"invalid candidate spec {s!r}: {e}") from None
    return out


def _pred(row: pd.Series) -> dict[str, float]:
    return {"mean": float(row["pred_dppl"]), "lower": float(row["pred_dppl_lower"]),
            "upper": float(row["pred_dppl_upper"])}


def recommend(model: str | Any, max_ppl_delta: float | None = None, *, max_ppl_ratio: float | None = None,
              max_kld: float | None = None, confidence: float = DECISION_CONFIDENCE, explore: bool = True,
              early_stop: bool = True,
              methods: list[str] | None = None, dtypes: list[str] | None = None,
              specs: list[str] | None = None, max_attempts: int = 3, out: str | Path | None = None, dry_run: bool = False, predictor=None,
              max_bytes: int | None = None, progress: bool = True, verify_export: str | None = None,
              force: bool = False, **prepare_kwargs: Any) -> Recommendation:
    """Pick, run and verify the cheapest candidate predicted to meet the budget.

    A candidate passes the prediction when its interval's upper bound (at ``confidence``) meets the
    budget; it is verified only when the sequential test on the packed model's measurement declares a
    pass: the measured upper bound at ``confidence`` meets the budget (advisor.sequential; with
    ``early_stop`` it may decide before all the protocol's windows, and it measures further windows
    while the bound straddles the budget; "inconclusive" is never verified). ``max_kld`` is a budget in
    mean KL divergence from the baseline: no predictor of KL ships, so the candidates are ranked and
    chosen with the predicted dL as a stand-in and the KL is measured, never predicted. The cheapest passing
    candidate is tried first; on a miss the next one (escalation). With ``explore``, attempts left (of
    ``max_attempts``) after a verified pass go to cheaper candidates that are plausible, i.e. whose
    predicted median dL meets the budget (at least as likely to pass as not), cheapest first; the
    cheapest verified one is the answer. Every answer is verified, so exploring spends attempts, never
    correctness (docs/recommend.md). Never claims success on a miss. ``max_bytes`` caps the weights'
    memory: no candidate above it is tried, first choice, escalation or exploration. Exit codes
    (``Recommendation.exit_code``): 0 verified (or dry run with a candidate), 2 nothing (within
    ``max_bytes``) predicted to meet the target, 3 every attempt missed, 4 the exported artifact
    (``verify_export``) measured outside the tolerance of what advisor measured.

    ``out``: the packed model goes to ``out/model`` (native format); an existing ``out`` follows
    :func:`advisor.models.saving.check_output` (``force`` to write into a folder advisor did not create).
    ``verify_export`` (``"compressed-tensors"`` or ``"gguf"``): only candidates that format holds exactly
    are considered, and each verified candidate is also exported (to ``out/FORMAT``, or a temporary
    folder without ``out``), loaded by the format's own loader (transformers) and measured on the same
    windows; the answer's two perplexities must agree within :data:`EXPORT_RTOL`.
    """

    t0 = time.perf_counter()
    if max_attempts < 1:
        raise AdvisorError(f"--max-attempts must be at least 1, got {max_attempts}")
    _check_request(confidence, max_bytes)
    Budget.from_args(1.0, max_ppl_delta, max_ppl_ratio, max_kld)  # validate the numbers before any work
    if out is not None:
        from advisor.models.saving import REPORT_NAMES, check_output_dir

        check_output_dir(out, force=force, names=REPORT_NAMES)
        check_output_dir(Path(out) / "model", force=force)
    requested = list(_specs(specs, None, None)) if specs is not None else []
    specs = _specs(specs, methods, dtypes)
    check_loaded = None
    if verify_export is not None:
        specs, check_loaded = _export_candidates(verify_export, specs, out, force)
    ctx = prepare(model, progress=progress, specs=specs, check_loaded=check_loaded, **prepare_kwargs)
    budget = Budget.from_args(ctx.baseline_ppl, max_ppl_delta, max_ppl_ratio, max_kld)
    df = predict_candidates(ctx, specs, confidence, predictor)
    # a KL budget is compared with the predicted dL: the stand-in, since no predictor of KL ships
    df["passes"] = df["pred_dl_upper"] <= budget.max_dl
    df["plausible"] = df["pred_dl"] <= budget.max_dl  # the median prediction meets the budget
    description = budget.description
    if max_bytes is not None:  # a memory cap: nothing above it is ever tried
        df["fits"] = df["bytes"] <= max_bytes
        over_memory = df[df["passes"] & ~df["fits"]]
        df["passes"] &= df["fits"]
        df["plausible"] &= df["fits"]
        description += f" within {max_bytes / 1e6:.2f} MB"
    passing = df[df["passes"]]
    common = dict(confidence=confidence, baseline_ppl=ctx.baseline_ppl, budget=description, max_ppl_delta=budget.dppl(ctx.baseline_ppl),
                  budget_metric=budget.metric, max_kld=budget.max_dl if budget.metric == "kld" else None,
                  kld_source="measured" if budget.metric == "kld" else None, early_stop=early_stop,
                  candidates=tuple(df.to_dict("records")), features=ctx.features,
                  protocol={"eval": ctx.eval.protocol, "calibration": ctx.calib.protocol},
                  provenance=dict(ctx.provenance, model=ctx.loaded.source.name, fingerprint=ctx.loaded.source.fingerprint,
                                  predictor=df.attrs["predictor"],
                                  outside_fitted_range=df.attrs["outside_fitted_range"],
                                  rtn_loss_on_demand=df.attrs["rtn_loss_on_demand"], requested_specs=requested))
    if passing.empty:
        msg = nearest_miss(df, budget.description, confidence)
        if max_bytes is not None and len(over_memory):
            cheapest = over_memory.iloc[0]
            msg = (f"no candidate within {max_bytes / 1e6:.2f} MB is predicted to meet {budget.description} at "
                   f"{confidence:.0%} confidence; the cheapest predicted to meet it is {cheapest['spec']} at "
                   f"{cheapest['bytes'] / 1e6:.2f} MB ({cheapest['bits_per_weight']:.2f} bits/weight)")
        return Recommendation(spec=None, verified=False, measured_ppl_delta=None, predicted=None, attempts=(),
                              exit_code=2, message=msg, seconds=time.perf_counter() - t0, **common)
    if dry_run:
        first = passing.iloc[0]
        return Recommendation(spec=first["spec"], verified=False, measured_ppl_delta=None, predicted=_pred(first),
                              attempts=(), exit_code=0, message="dry run: nothing was quantized",
                              seconds=time.perf_counter() - t0, **common)
    by_pos: dict[int, Attempt] = {}  # position in cost order -> attempt, in the order run
    saved = None
    exports: dict[int, dict[str, Any]] = {}

    def measure(pos: int, reason: str) -> bool:
        nonlocal saved
        attempt, quantized = _execute(ctx, df.iloc[pos], budget, progress, reason, confidence, early_stop)
        by_pos[pos] = attempt
        try:
            if attempt.passed and out is not None:
                from advisor.models.saving import claim_report_folder

                claim_report_folder(out)
                # atomic: replaces a previous, dearer pass
                saved = str(_save(ctx, quantized, attempt, out, force=force))
            if attempt.passed and verify_export is not None:
                exports[pos] = _verify_export(ctx, quantized, attempt, verify_export, out, force, progress)
        finally:
            _restore(ctx, quantized)
        return attempt.passed

    best = search_cheapest_verified(df["passes"], df["plausible"], max_attempts, explore, measure)
    attempts = list(by_pos.values())
    if best is not None:
        a = by_pos[best]
        others = [x for x in attempts if x is not a]
        tail = ""
        if others:
            tail = "; also tried " + ", ".join(f"{x.spec} ({_verdict_words(x)}, {_measured(x, budget)})" for x in others)
        export = exports.get(best)
        if export is not None and not export["passed"]:
            return Recommendation(spec=a.spec, verified=False, measured_ppl_delta=a.measured_ppl_delta,
                                  predicted=a.predicted, attempts=tuple(attempts), saved_to=saved, exit_code=4,
                                  message=export["message"], export=export,
                                  seconds=time.perf_counter() - t0, **common)
        if export is not None:
            tail += "; " + export["message"]
        return Recommendation(export=export, spec=a.spec, verified=True, measured_ppl_delta=a.measured_ppl_delta,
                              predicted=a.predicted, attempts=tuple(attempts), saved_to=saved, exit_code=0,
                              message=f"verified: {a.spec} {_measured(a, budget)}, upper bound at {confidence:.0%} "
                                      f"{a.looks[-1]['upper']:.4g} <= {budget.max_dl:.4g} ({_metric_name(budget)}) "
                                      f"after {a.n_windows} windows{tail}",
                              seconds=time.perf_counter() - t0, **common)
    inconclusive = sum(x.verdict == "inconclusive" for x in attempts)
    why = (f" ({inconclusive} inconclusive: the bound at {confidence:.0%} still straddled the budget after every "
           "window measured; a longer --eval text or a lower --confidence can decide them)") if inconclusive else ""
    return Recommendation(spec=None, verified=False, measured_ppl_delta=None, predicted=None, attempts=tuple(attempts),
                          exit_code=3, message=f"no attempt ({len(attempts)}) was verified to meet {budget.description}"
                                               f"{why}; raise --max-attempts or the budget",
                          seconds=time.perf_counter() - t0, **common)


def _metric_name(budget: Budget) -> str:
    return "mean KL, nats" if budget.metric == "kld" else "dL, nats"


def _measured(a: Attempt, budget: Budget) -> str:
    if budget.metric == "kld":
        return f"measured mean KL {a.kld['mean']:.4g}"
    return f"measured dPPL {a.measured_ppl_delta:.4f}"


def _verdict_words(a: Attempt) -> str:
    return {"pass": "passed", "miss": "missed"}.get(a.verdict, "inconclusive")


def search_cheapest_verified(passes, plausible, max_attempts: int, explore: bool, measure) -> int | None:
    """recommend's search over candidates in cost order (positions 0..n-1, cheapest first).

    ``measure(pos, reason) -> bool`` runs one attempt and says whether it was verified. Stage one
    tries the candidates that ``passes`` (upper bound meets the budget), cheapest first, until one is
    verified ("first choice", then "escalation"); stage two, with ``explore``, tries the cheaper ones
    that are only ``plausible`` (median meets it), cheapest first ("cheaper"). At most
    ``max_attempts`` in all. Returns the position of the cheapest verified candidate, or None.
    The offline replay (benchmarks/recommend_confidence.py) runs the same function on recorded
    measurements.
    """
    passes, plausible = np.asarray(passes, bool), np.asarray(plausible, bool)
    tried, best = 0, None
    for pos in np.flatnonzero(passes):
        if tried >= max_attempts:
            break
        tried += 1
        if measure(int(pos), "first choice" if tried == 1 else "escalation"):
            best = int(pos)
            break
    if best is not None and explore:
        for pos in np.flatnonzero(plausible[:best] & ~passes[:best]):
            if tried >= max_attempts:
                break
            tried += 1
            if measure(int(pos), "cheaper"):
                best = int(pos)
                break
    return best


def _execute(ctx: Context, row: pd.Series, budget: Budget, progress: bool, reason: str = "first choice",
             confidence: float = DECISION_CONFIDENCE, early_stop: bool = True):
    """Quantize with the packed kernels and verify by the sequential test (advisor.sequential): measure the
    evaluation windows in looks, stop once the bound at ``confidence`` clears or misses the budget, go on
    to further windows of the same text while it straddles it. Records the run; returns the attempt and
    the swap state."""
    from advisor.models.evaluate import merge_kl, paired_se, perplexity
    from advisor.models.pipeline import quantize_model
    from advisor.models.saving import package_versions
    from advisor.sequential import PASS, SequentialRule, plan_looks

    reference = _reference(ctx, progress)  # the baseline's distributions, before any weight changes
    k = len(ctx.eval)
    windows = _verification_windows(ctx)
    rule = SequentialRule(plan_looks(k, len(windows), early_stop=early_stop), confidence)
    t0 = time.perf_counter()
    originals = {name: layer for name, layer in ctx.loaded.adapter.linear_layers()}
    result = quantize_model(ctx.loaded, row["spec"], ctx.calib, pack=True, progress=progress)
    nll_q: list[float] = []
    kld_w: list[float] = []
    stages = []
    looks: list[dict[str, Any]] = []
    for i, n in enumerate(rule.looks):
        if n > reference.target_logp.shape[0]:  # the baseline's distributions on the extension windows
            reference = _extend_reference(ctx, originals, windows, n, progress)
        r = perplexity(ctx.loaded.model, windows, batch_size=ctx.protocol.batch_size, progress=progress,
                       desc=f"verify {row['spec']} ({n} windows)", reference=reference, start=len(nll_q), stop=n)
        nll_q.extend(r.window_nll)
        kld_w.extend(r.kld.window_kld)
        stages.append(r.kld)
        base = reference.window_nll[:n]
        d = kld_w if budget.metric == "kld" else [q - b for q, b in zip(nll_q, base)]
        verdict, est, se = rule.decide(d, budget.max_dl, final=i == len(rule.looks) - 1)
        looks.append({"n_windows": n, "estimate": est, "se": se, "z": rule.z,
                      "lower": None if se is None else est - rule.z * se,
                      "upper": None if se is None else est + rule.z * se, "verdict": verdict})
        if verdict != "continue":
            break
    n = len(nll_q)
    kld = merge_kl(stages)
    base_nll = sum(reference.window_nll[:n]) / n
    nll = sum(nll_q) / n
    dl = nll - base_nll
    dl_se = paired_se(nll_q, reference.window_nll[:n])
    seconds = time.perf_counter() - t0
    protocol = dict(ctx.eval.protocol, n_windows=n)
    if n > k:  # the protocol's windows, then further ones that avoid the calibration text
        protocol["windows"] = "first-n-non-overlapping-then-next-avoiding-calibration"
    ctx.store.add_run(model_fp=ctx.loaded.source.fingerprint, model_name=ctx.loaded.source.name, spec=row["spec"],
                      calibration=ctx.calib.protocol, protocol=protocol, seed=ctx.calib.protocol.get("seed", 0),
                      status="ok", ppl=math.exp(nll), baseline_ppl=math.exp(base_nll), nll=nll, baseline_nll=base_nll,
                      dl=dl, dl_se=dl_se, kld=kld.to_dict(), bits_per_weight=result.bits_per_weight,
                      seconds=seconds, packed=1, source="recommend",
                      versions=package_versions(), extra={"predicted_dl": float(row["pred_dl"]), "looks": looks})
    attempt = Attempt(spec=row["spec"], predicted=_pred(row), measured_ppl_delta=math.exp(nll) - math.exp(base_nll),
                      measured_dl=dl, bits_per_weight=result.bits_per_weight, seconds=seconds,
                      passed=verdict == PASS, reason=reason, bytes=int(row["bytes"]), dl_se=dl_se,
                      kld=kld.to_dict(), n_windows=n, verdict=verdict, looks=tuple(looks))
    return attempt, (originals, result)


def _verification_windows(ctx: Context):
    """The windows the sequential test draws from: the evaluation windows, then their extension."""
    import torch

    from advisor.models.data import Windows

    extension = _extension(ctx)
    return Windows(torch.cat([ctx.eval.ids, extension.ids]), ctx.eval.protocol,
                   tuple(ctx.eval.offsets) + tuple(extension.offsets))


def _extension(ctx: Context):
    """The windows after the evaluation windows, on the same grid of the same text, avoiding the calibration
    windows: as many as the protocol's again at most (cut once per context)."""
    if ctx.extension is None:
        from advisor.models.data import load_corpus, more_eval_windows

        ctx.extension = more_eval_windows(ctx.loaded.tokenizer, load_corpus(ctx.protocol.eval), ctx.eval,
                                          len(ctx.eval), avoid=ctx.calib)
    return ctx.extension


def _swapped_to_baseline(ctx: Context, originals: dict[str, Any]):
    """A context manager: the baseline's layers in place of the quantized ones, put back on exit."""
    from contextlib import contextmanager

    from advisor.models.pipeline import set_module

    @contextmanager
    def swap():
        quantized = {name: layer for name, layer in ctx.loaded.adapter.linear_layers()}
        for name, layer in originals.items():
            set_module(ctx.loaded.model, name, layer)
        try:
            yield
        finally:
            for name, layer in quantized.items():
                set_module(ctx.loaded.model, name, layer)

    return swap()


def _extend_reference(ctx: Context, originals: dict[str, Any], windows, n: int, progress: bool):
    """The baseline's reference extended to the first ``n`` of ``windows`` (measured with the baseline's
    layers swapped back in for the purpose; kept in the context for the next attempts)."""
    from advisor.models.evaluate import DEFAULT_TOP_K, extend_reference, perplexity

    have = ctx.reference.target_logp.shape[0]
    with _swapped_to_baseline(ctx, originals):
        more = perplexity(ctx.loaded.model, windows, batch_size=ctx.protocol.batch_size, progress=progress,
                          desc="baseline distributions (more windows)", top_k=DEFAULT_TOP_K, start=have,
                          stop=len(windows)).reference
    ctx.reference = extend_reference(ctx.reference, more)
    return ctx.reference


def _reference(ctx: Context, progress: bool):
    """The baseline's bounded next-token distributions on the evaluation windows (KL statistics, paired
    standard errors), measured once per context, on first use, while the weights are the baseline's."""
    if ctx.reference is None:
        from advisor.models.evaluate import DEFAULT_TOP_K, perplexity

        ctx.reference = perplexity(ctx.loaded.model, ctx.eval, batch_size=ctx.protocol.batch_size, progress=progress,
                                   desc="baseline distributions", top_k=DEFAULT_TOP_K).reference
    return ctx.reference


def _restore(ctx: Context, quantized) -> None:
    """Put the original nn.Linear modules back (the pipeline swapped in QuantLinear modules)."""
    from advisor.models.pipeline import set_module

    originals, _ = quantized
    for name, layer in originals.items():
        set_module(ctx.loaded.model, name, layer)


def _record(ctx: Context, attempt: Attempt) -> dict[str, Any]:
    """What a saved or exported model states about its measurement (the same keys as quantize's)."""
    from advisor.jsonio import protocol_fingerprint

    return {"spec": attempt.spec, "ppl": ctx.baseline_ppl + attempt.measured_ppl_delta,
            "baseline_ppl": ctx.baseline_ppl, "ppl_delta": attempt.measured_ppl_delta, "dl": attempt.measured_dl,
            "bits_per_weight": attempt.bits_per_weight, "attempt": attempt.to_dict(),
            "protocol": ctx.eval.protocol, "calibration": ctx.calib.protocol,
            "protocol_fingerprint": protocol_fingerprint(ctx.eval.protocol, ctx.calib.protocol)}


def _save(ctx: Context, quantized, attempt: Attempt, out: str | Path, force: bool = False) -> Path:
    from advisor.models.saving import save_quantized_model

    _, result = quantized
    return save_quantized_model(ctx.loaded, result, _record(ctx, attempt), Path(out) / "model", force=force)


# Relative perplexity difference allowed between advisor's packed kernels and the export's own loader on
# the same windows: both compute in the model's dtype from the same grid values, in a different
# summation order (measured: below 1e-4 in float32, tests/test_export.py).
EXPORT_RTOL = 1e-3


def _export_candidates(fmt: str, specs: list[str], out: str | Path | None, force: bool):
    """The candidates ``fmt`` holds exactly, and a check of the loaded model's architecture; refuses a
    format with no loader here, or a grid with nothing left, before any work."""
    from advisor.models.export import LOADER_FORMATS, check_export_architecture, check_output, export_refusal
    from advisor.quantizers import QuantSpec

    if fmt not in LOADER_FORMATS:
        raise AdvisorError(f"--verify-export {fmt}: no loader for it runs on this machine; verify one of "
                           f"{', '.join(LOADER_FORMATS)} (`advisor export` writes the others)")
    kept = [s for s in specs if export_refusal(fmt, QuantSpec.parse(s)) is None]
    if not kept:
        raise AdvisorError(f"--verify-export {fmt}: none of the {len(specs)} candidate specs can be written exactly "
                           f"as {fmt} ({export_refusal(fmt, QuantSpec.parse(specs[0]))})")
    if out is not None:
        check_output(Path(out) / fmt, "--out", force=force)
    return kept, lambda loaded: check_export_architecture(fmt, loaded.model.config)


def _verify_export(ctx: Context, quantized, attempt: Attempt, fmt: str, out: str | Path | None, force: bool,
                   progress: bool) -> dict[str, Any]:
    """Export the packed model as ``fmt``, load it with that format's own loader and measure it on the
    windows the attempt measured (the sequential test may have stopped before the protocol's last window
    or gone past it); the result states both perplexities and whether they agree within EXPORT_RTOL."""
    import shutil
    import tempfile

    import torch

    from advisor.models.data import Windows
    from advisor.models.evaluate import perplexity
    from advisor.models.export import export_model, load_export

    n = attempt.n_windows
    windows = _verification_windows(ctx)
    windows = Windows(windows.ids[:n], windows.protocol, tuple(windows.offsets[:n]))
    base_nll = sum(ctx.reference.window_nll[:n]) / n
    advisor_ppl = math.exp(base_nll + attempt.measured_dl)

    _, result = quantized
    dtype = next((p.dtype for p in ctx.loaded.model.parameters() if p.is_floating_point()), None)
    tmp = None if out is not None else Path(tempfile.mkdtemp(prefix="advisor-export-"))
    try:
        target = Path(out) / fmt if out is not None else tmp / fmt
        path = export_model(ctx.loaded, result, _record(ctx, attempt), target, fmt, force=force)
        model, loader = load_export(path, fmt, dtype=dtype or torch.float32)
        model.to(next(iter(ctx.loaded.model.parameters())).device)
        r = perplexity(model, windows, batch_size=ctx.protocol.batch_size, progress=progress,
                       desc=f"verify {fmt} export ({n} windows)")
        del model
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rel = r.ppl / advisor_ppl - 1
    passed = bool(abs(rel) <= EXPORT_RTOL)
    if passed:
        message = (f"the {fmt} export measures ppl {r.ppl:.4f} in {loader}, advisor {advisor_ppl:.4f} "
                   f"(relative difference {rel:+.1e}, within {EXPORT_RTOL:g})")
    else:
        message = (f"export verification failed: the {fmt} export of {attempt.spec} measures ppl {r.ppl:.4f} in "
                   f"{loader}, advisor measured {advisor_ppl:.4f} (relative difference {rel:+.2e}, beyond "
                   f"{EXPORT_RTOL:g}); do not ship it: use --format native, or another --verify-export format")
    return {"format": fmt, "loader": loader, "path": str(path) if out is not None else None,
            "advisor_ppl": advisor_ppl, "loader_ppl": r.ppl, "rel_diff": rel, "tolerance": EXPORT_RTOL,
            "passed": passed, "message": message}
