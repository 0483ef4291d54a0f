"""`advisor plan`: what fits in a memory budget, what quality at which cost; predicts only, quantizes nothing."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_json_arg, add_memory_args, add_model_args, add_protocol_args

    add_model_args(p)
    q = p.add_mutually_exclusive_group()
    q.add_argument("--max-ppl-delta", type=float, help="largest allowed perplexity increase (absolute)")
    q.add_argument("--max-ppl-ratio", type=float, help="largest allowed ppl_q / ppl_fp, e.g. 1.03")
    add_memory_args(p)
    p.add_argument("--confidence", type=float, default=0.9,
                   help="coverage of the interval whose upper bound must meet the perplexity budget (default 0.9)")
    p.add_argument("--methods", default=None, help="comma-separated methods to consider (default all)")
    p.add_argument("--dtypes", default=None, help="comma-separated data types to consider (default all)")
    p.add_argument("--specs", nargs="+", default=None,
                   help="the candidates, any formats (e.g. rtn:fp6_e3m2:g128 gptq:int3:g256); default: the default "
                        "grid, filtered by --methods/--dtypes")
    add_protocol_args(p)
    p.add_argument("--store", default=None, help="measurement store (default ADVISOR_HOME/measurements.sqlite)")
    p.add_argument("--predictor", default=None, help="predictor JSON from `advisor fit` (default: shipped)")
    p.add_argument("--csv", default=None, help="also write every candidate to this CSV file")
    p.add_argument("--top", type=int, default=40, help="candidates shown in the table (default 40)")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    """Exit 0 with a chosen candidate (or with no budget given), 2 when no candidate meets the budgets."""
    from advisor.api import plan
    from advisor.cli import emit_json
    from advisor.commands._common import memory_budget, predictor_from, protocol_kwargs
    from advisor.commands._common import split_list
    from advisor.report import plan_message, plan_table

    from advisor.models.errors import AdvisorError

    if args.top < 1:
        raise AdvisorError(f"--top must be at least 1, got {args.top}")
    if args.csv is not None and not args.csv.strip():
        raise AdvisorError("--csv needs a file name, got an empty one")
    if args.csv:
        from advisor.models.saving import check_output_dir

        check_output_dir(args.csv, "--csv")  # before the work, not after it
    max_bytes = memory_budget(args)
    predictor = predictor_from(args)
    df = plan(args.model, args.max_ppl_delta, max_bytes, max_ppl_ratio=args.max_ppl_ratio,
              confidence=args.confidence, methods=split_list(args.methods), dtypes=split_list(args.dtypes, "--dtypes"),
              specs=args.specs,
              predictor=predictor, **protocol_kwargs(args))
    budgeted = "passes" in df or "fits" in df
    code = 0 if df["chosen"].any() or not budgeted else 2
    if args.csv:
        from advisor.models.saving import atomic_write_text

        atomic_write_text(args.csv, df.to_csv(index=False))
    message = plan_message(df)
    if args.json:
        chosen = df[df["chosen"]]
        from advisor.jsonio import document

        emit_json(document({"baseline_ppl": df.attrs["baseline_ppl"], "predictor": df.attrs["predictor"],
                            "budget": df.attrs["budget"], "outside_fitted_range": df.attrs["outside_fitted_range"],
                            "rtn_loss_on_demand": df.attrs["rtn_loss_on_demand"],
                            "chosen": chosen["spec"].iloc[0] if len(chosen) else None, "message": message,
                            "candidates": df.to_dict("records")}, confidence=args.confidence,
                           eval_protocol=df.attrs.get("protocol", {}).get("eval"),
                           calibration=df.attrs.get("protocol", {}).get("calibration")))
    else:
        print(plan_table(df, top=args.top))
        print(message)
    return code
