"""Reports of a recommendation: a terminal table, and a folder with markdown, JSON and a PNG plot."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from advisor.models.saving import atomic_write_text, claim_report_folder


def _se(x: float | None, digits: int) -> str:
    return "" if x is None else f" ± {x:.{digits}f}"


def _dppl_se(baseline_ppl: float, a) -> float | None:
    """Standard error of an attempt's measured dPPL (delta method on its paired dL standard error)."""
    import math

    se = getattr(a, "dl_se", None)
    return None if se is None else baseline_ppl * math.exp(a.measured_dl) * se


def format_measurement(m: dict[str, Any]) -> str:
    """A measurement against its baseline: ``dPPL = x ± se (dL ...), KL mean ± se, ...``.

    ``m``: ``ppl_delta``, ``dl``, ``dl_se``, ``baseline_ppl`` and optionally ``kld`` (KLStats.to_dict())."""
    import math

    dl, se = m["dl"], m.get("dl_se")
    dppl_se = None if se is None else m["baseline_ppl"] * math.exp(dl) * se  # delta method
    text = f"dPPL = {m['ppl_delta']:+.4f}{_se(dppl_se, 4)} (dL {dl:+.5f}{_se(se, 5)} nats)"
    k = m.get("kld")
    if k:
        text += (f", KL mean {k['mean']:.5f}{_se(k.get('se'), 5)} (median {k['median']:.5f}, p99 {k['p99']:.4f}, "
                 f"max {k['max']:.3f}), same top token {k['same_top_rate']:.1%}, mean |dp| {k['mean_abs_dp']:.4f}")
    return text


def extrapolation_footnote(method_guard: bool | None) -> str:
    """The footnote for candidates marked `*` (method gain extrapolated); ``None``: the predictor is unknown."""
    bound = {True: "the predictor's upper bound allows no gain there",
             False: "this predictor's interval assumes the gain holds, which on a real LLM at 2-3 bits it often "
                    "does not",
             None: "the shipped predictor's upper bound allows no gain there"}[method_guard]
    return ("* the method's gain over RTN is extrapolated beyond the RTN losses it was fitted on: do not count on "
            f"it ({bound}; docs/predictor.md)")


def scale_note(outside: dict[str, dict[str, Any]]) -> list[str]:
    """A line saying where the model's scale lies outside the predictor's fitted range (none when inside)."""
    parts = []
    for term, d in outside.items():
        (lo, hi), v = d["fitted"], d["value"]
        if term == "log_params":
            parts.append(f"{10 ** v / 1e6:.3g}M non-embedding parameters (fitted {10 ** lo / 1e6:.3g}-"
                         f"{10 ** hi / 1e6:.3g}M)")
        else:
            parts.append(f"baseline NLL {v:.2f} nats (fitted {lo:.2f}-{hi:.2f})")
    if not parts:
        return []
    return [f"note: this model is outside the range the predictor was fitted on: {', '.join(parts)}. Its "
            "corrections are held at that range's edge and the measured RTN loss carries the model's scale; "
            "`advisor fit --report` gives the held-out error on a real model (docs/predictor.md)"]


_HEADER = f"{'spec':<30} {'bits/w':>7} {'MB':>9} {'speed':>6} {'pred dPPL':>10} {'interval':>21}"


ESTIMATED_FOOTNOTE = ("# no RTN loss could be measured for this format: the second-order estimate stands in "
                      "(estimated_physics), and the interval is widened to cover the measured finer and coarser "
                      "formats (docs/predictor.md)")


def physics_notes(rows: list[dict[str, Any]], on_demand: list[str]) -> list[str]:
    """Lines saying which formats' RTN loss was measured for this request (``on_demand``: format keys) and,
    when some row is marked `#`, the footnote for a physics term that is an estimate."""
    lines = []
    if on_demand:
        lines.append(f"measured the RTN loss of {len(on_demand)} format(s) on demand (rtn_loss probe on the "
                     f"calibration windows, stored for the next request): {', '.join(on_demand)}")
    if any(r.get("estimated_physics") for r in rows):
        lines.append(ESTIMATED_FOOTNOTE)
    return lines


def marks(c: dict[str, Any]) -> str:
    """A candidate's marks: `*` method gain extrapolated, `#` physics estimated."""
    return (" *" if c.get("method_gain_extrapolated") else "") + (" #" if c.get("estimated_physics") else "")


def _row(c: dict[str, Any], *flags: str) -> str:
    """One candidate: cost, predicted dPPL and interval, then ``flags`` (and the marks of ``marks``)."""
    mark = marks(c)
    # "~": not measured on this machine, the memory-bound estimate 16 / bits (advisor/kernel_speed.py)
    speed = ("~" if c.get("speed_source") == "estimate" else "") + f"{c['relative_speed']:.2f}"
    return (f"{c['spec']:<30} {c['bits_per_weight']:7.3f} {c['bytes'] / 1e6:9.2f} {speed:>6} "
            f"{c['pred_dppl']:10.4f} [{c['pred_dppl_lower']:9.4f},{c['pred_dppl_upper']:9.4f}] "
            + " ".join(f"{f:>4}" for f in flags) + mark)


def _footnote(shown: list[dict[str, Any]], predictor: dict[str, Any]) -> list[str]:
    if not any(c.get("method_gain_extrapolated") for c in shown):
        return []
    return [extrapolation_footnote(predictor.get("design_options", {}).get("method_guard"))]


def candidates_table(rec, top: int = 12) -> str:
    """The cheapest candidates with predicted dPPL intervals, and the attempts, as plain text."""
    limit = (f"mean KL measured, not predicted; candidates ranked by predicted dL as its stand-in"
             if rec.max_ppl_delta is None else f"dPPL <= {rec.max_ppl_delta:.4f}")
    lines = [f"baseline ppl {rec.baseline_ppl:.4f}; budget {rec.budget} ({limit})", "", _HEADER + " pass"]
    # the candidates a user listed are all shown; of the default grid, the cheapest ``top``
    shown = list(rec.candidates if rec.provenance.get("requested_specs") else rec.candidates[:top])
    lines += [_row(c, "yes" if c.get("passes") else "no") for c in shown]
    lines += _footnote(shown, rec.provenance.get("predictor", {}))
    lines += physics_notes(shown, rec.provenance.get("rtn_loss_on_demand", []))
    lines += scale_note(rec.provenance.get("outside_fitted_range", {}))
    if rec.attempts:
        lines += ["", "attempts (predicted vs measured dPPL; verdict of the sequential test at "
                      f"{rec.confidence:.0%} after the windows measured):"]
        for a in rec.attempts:
            p = a.predicted
            kl = "" if not a.kld else f"  KL {a.kld['mean']:.4g}{_se(a.kld.get('se'), 4)}"
            verdict = (a.verdict or ("pass" if a.passed else "miss")).upper()
            lines.append(f"  {a.spec:<28} predicted {p['mean']:.4f} [{p['lower']:.4f}, {p['upper']:.4f}]  "
                         f"measured {a.measured_ppl_delta:.4f}{_se(_dppl_se(rec.baseline_ppl, a), 4)}{kl}  "
                         f"{verdict} ({a.n_windows} windows, {a.seconds:.1f}s, {a.reason})")
    lines += ["", rec.message]
    return "\n".join(lines)


def plan_table(df, top: int = 40) -> str:
    """`advisor plan`'s table: the cheapest ``top`` candidates (every one when the user listed them,
    ``df.attrs["requested"]``), with `pass`/`fits` when those budgets were given, and `<-` on the chosen one
    (always shown)."""
    b = df.attrs.get("budget", {})
    head = f"baseline ppl {df.attrs['baseline_ppl']:.4f}"
    if "description" in b:
        head += f"; budget {b['description']} (dPPL <= {b['max_ppl_delta']:.4f}) at {b['confidence']:.0%} confidence"
    if b.get("max_bytes") is not None:
        head += f"; memory <= {b['max_bytes'] / 1e6:.2f} MB"
    cols = [c for c in ("passes", "fits") if c in df]
    lines = [head, "", _HEADER + "".join(" " + {"passes": "pass", "fits": "fits"}[c] for c in cols)]
    rows = df.to_dict("records")
    everything = bool(df.attrs.get("requested"))
    shown = [c for i, c in enumerate(rows) if everything or i < top or c.get("chosen")]
    for c in shown:
        line = _row(c, *("yes" if c[k] else "no" for k in cols))
        lines.append(line + ("  <- chosen" if c.get("chosen") else ""))
    if len(shown) < len(rows):
        lines.append(f"... {len(rows) - len(shown)} more (--top, --csv)")
    lines += _footnote(shown, df.attrs.get("predictor", {}))
    lines += physics_notes(shown, df.attrs.get("rtn_loss_on_demand", []))
    lines += scale_note(df.attrs.get("outside_fitted_range", {}))
    return "\n".join(lines)


def plan_message(df) -> str:
    """One line: what was chosen and why, or why nothing was."""
    b = df.attrs.get("budget", {})
    chosen = df[df["chosen"]]
    if len(chosen):
        c = chosen.iloc[0]
        why = ("the best predicted quality that fits" if "fits" in df else "the cheapest predicted to pass")
        return (f"chosen: {c['spec']} ({why}): {c['bits_per_weight']:.3f} bits/weight, {c['bytes'] / 1e6:.2f} MB, "
                f"predicted dPPL {c['pred_dppl']:.4f} [{c['pred_dppl_lower']:.4f}, {c['pred_dppl_upper']:.4f}]")
    if "passes" not in df and "fits" not in df:
        return f"{len(df)} candidates; give --max-ppl-delta/--max-ppl-ratio and/or --max-gb to choose one"
    if "fits" in df and not df["fits"].any():
        small = df.loc[df["bytes"].idxmin()]
        return (f"nothing fits in {b['max_bytes'] / 1e6:.2f} MB: the smallest candidate, {small['spec']}, "
                f"needs {small['bytes'] / 1e6:.2f} MB")
    from advisor.api import nearest_miss

    if "fits" in df:
        return nearest_miss(df[df["fits"]], b["description"], b["confidence"], " among those that fit")
    return nearest_miss(df, b["description"], b["confidence"])


def plot(rec, path: Path) -> Path:
    """Predicted (with interval) and measured dPPL against bits per weight, with the target line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    cands = list(rec.candidates)
    xs = [c["bits_per_weight"] for c in cands]
    ys = [c["pred_dppl"] for c in cands]
    lo = [c["pred_dppl"] - c["pred_dppl_lower"] for c in cands]
    hi = [c["pred_dppl_upper"] - c["pred_dppl"] for c in cands]
    ax.errorbar(xs, ys, yerr=[lo, hi], fmt="o", ms=4, alpha=0.6, capsize=2, label="predicted (interval)")
    if rec.attempts:
        ax.scatter([a.bits_per_weight for a in rec.attempts], [a.measured_ppl_delta for a in rec.attempts],
                   marker="*", s=160, c=["tab:green" if a.passed else "tab:red" for a in rec.attempts],
                   zorder=5, label="measured (packed)")
    if rec.max_ppl_delta is not None:  # a KL budget has no dPPL line
        ax.axhline(rec.max_ppl_delta, color="k", ls="--", lw=1, label=f"target dPPL {rec.max_ppl_delta:.3g}")
    ax.set_yscale("symlog", linthresh=max((rec.max_ppl_delta or 1e-2) / 10, 1e-3))
    ax.set_xlabel("bits per weight")
    ax.set_ylabel("perplexity increase (dPPL)")
    ax.set_title(f"{rec.provenance.get('model', '')} {rec.spec or 'no verified spec'}")
    ax.legend(loc="upper right", fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path


def write_report(rec, folder: str | Path) -> dict[str, str]:
    """recommendation.json, report.md and dppl_vs_bits.png in ``folder`` (each written atomically), and
    the folder's manifest (``recommend --out``'s rules, :func:`advisor.models.saving.check_output`)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = rec.to_dict()
    from advisor.jsonio import dumps

    js = atomic_write_text(folder / "recommendation.json", dumps(data))
    png = plot(rec, folder / "dppl_vs_bits.png")
    pred = rec.provenance.get("predictor", {})
    md = ["# advisor recommendation", "", f"- model: `{rec.provenance.get('model', '')}`",
          f"- predictor: {pred.get('source', 'unknown')} (format {pred.get('format_version', '?')}, "
          f"fitted on {pred.get('n_train', '?')} runs)",
          f"- result: **{rec.spec or 'none'}** ({'verified' if rec.verified else 'not verified'})",
          f"- {rec.message}", "", "```", candidates_table(rec, top=40), "```", "",
          "![predicted and measured dPPL](dppl_vs_bits.png)", ""]
    report = atomic_write_text(folder / "report.md", "\n".join(md))
    claim_report_folder(folder)  # the manifest lists what advisor wrote here
    return {"json": str(js), "markdown": str(report), "plot": str(png)}
