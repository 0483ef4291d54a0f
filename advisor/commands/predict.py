"""`advisor predict`: predicted dL and dPPL (mean and interval) for one spec or every candidate."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_json_arg, add_model_args, add_protocol_args

    add_model_args(p)
    p.add_argument("--spec", default=None, help="one spec (default: every candidate of the default grid)")
    add_protocol_args(p)
    p.add_argument("--confidence", type=float, default=0.9, help="coverage of the predicted interval (default 0.9)")
    p.add_argument("--predictor", default=None, help="predictor JSON (default: shipped)")
    p.add_argument("--store", default=None, help="measurement store (default ADVISOR_HOME/measurements.sqlite)")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.api import predict_candidates, prepare
    from advisor.cli import emit_json
    from advisor.commands._common import predictor_from, protocol_kwargs
    from advisor.quantizers import QuantSpec

    specs = [str(QuantSpec.parse(args.spec))] if args.spec else None
    predictor = predictor_from(args)
    ctx = prepare(args.model, specs=specs, **protocol_kwargs(args))
    df = predict_candidates(ctx, specs, args.confidence, predictor)
    rows = df.to_dict("records")  # the candidate row schema plan and recommend share
    for r in rows:
        r["mean"], r["lower"], r["upper"] = r["pred_dppl"], r["pred_dppl_lower"], r["pred_dppl_upper"]
    outside, info = df.attrs["outside_fitted_range"], df.attrs["predictor"]
    if args.json:
        common = {"baseline_ppl": ctx.baseline_ppl, "predictor": info, "outside_fitted_range": outside,
                  "rtn_loss_on_demand": df.attrs["rtn_loss_on_demand"]}
        from advisor.jsonio import document

        shared = df.to_dict("records")
        doc = dict(common, candidate=shared[0]) if args.spec else dict(common, candidates=shared)
        emit_json(document(doc, confidence=args.confidence, eval_protocol=ctx.eval.protocol,
                           calibration=ctx.calib.protocol))
        return 0
    print(f"baseline ppl {ctx.baseline_ppl:.4f}; predictor {info['source']} (format {info['format_version']}, "
          f"fitted on {info['n_train']} runs)")
    from advisor.report import extrapolation_footnote, marks, physics_notes, scale_note

    for r in rows:
        print(f"{r['spec']:<30} {r['bits_per_weight']:6.3f} b/w  dPPL {r['mean']:.4f} [{r['lower']:.4f}, {r['upper']:.4f}]"
              f"{marks(r)}")
    if any(r["method_gain_extrapolated"] for r in rows):
        print(extrapolation_footnote(info["design_options"]["method_guard"]))
    for line in physics_notes(rows, df.attrs["rtn_loss_on_demand"]):
        print(line)
    for line in scale_note(outside):
        print(line)
    return 0
