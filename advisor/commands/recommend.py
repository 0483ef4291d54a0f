"""`advisor recommend`: the main job. Exit 0 verified, 2 nothing predicted to meet the target, 3 all missed."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_json_arg, add_memory_args, add_model_args, add_protocol_args

    add_model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-ppl-delta", type=float, help="largest allowed perplexity increase (absolute)")
    g.add_argument("--max-ppl-ratio", type=float, help="largest allowed ppl_q / ppl_fp, e.g. 1.03")
    add_memory_args(p)
    p.add_argument("--confidence", type=float, default=0.9,
                   help="coverage of the interval whose upper bound must meet the budget for the first "
                        "choice and escalations (default 0.9)")
    p.add_argument("--no-explore", action="store_true",
                   help="stop at the first verified candidate (default: attempts left then try cheaper "
                        "candidates whose median prediction meets the budget)")
    p.add_argument("--methods", default=None, help="comma-separated methods to consider (default all)")
    p.add_argument("--dtypes", default=None, help="comma-separated data types to consider (default all)")
    p.add_argument("--specs", nargs="+", default=None,
                   help="the candidates, any formats (e.g. rtn:fp6_e3m2:g128 gptq:int3:g256); default: the default "
                        "grid, filtered by --methods/--dtypes")
    p.add_argument("--max-attempts", type=int, default=3, help="candidates to try before giving up (default 3)")
    add_protocol_args(p)
    p.add_argument("--store", default=None, help="measurement store (default ADVISOR_HOME/measurements.sqlite)")
    p.add_argument("--predictor", default=None, help="predictor JSON from `advisor fit` (default: shipped)")
    p.add_argument("--out", default=None, help="report folder (markdown, JSON, PNG, packed model)")
    p.add_argument("--dry-run", action="store_true", help="predict and rank only; quantize nothing")
    add_json_arg(p)


def run(args: argparse.Namespace) -> int:
    from advisor.api import recommend
    from advisor.cli import emit_json
    from advisor.report import candidates_table, write_report

    from advisor.commands._common import memory_budget, predictor_from, protocol_kwargs, split_list

    if args.out is not None and not args.out.strip():
        from advisor.models.errors import AdvisorError

        raise AdvisorError("--out needs a folder name, got an empty one")
    max_bytes = memory_budget(args)
    predictor = predictor_from(args)
    rec = recommend(args.model, args.max_ppl_delta, max_ppl_ratio=args.max_ppl_ratio, confidence=args.confidence,
                    explore=not args.no_explore,
                    methods=split_list(args.methods), dtypes=split_list(args.dtypes, "--dtypes"),
                    specs=args.specs, max_attempts=args.max_attempts,
                    out=args.out, dry_run=args.dry_run, predictor=predictor, max_bytes=max_bytes,
                    **protocol_kwargs(args))
    files = write_report(rec, args.out) if args.out else {}
    if args.json:
        d = rec.to_dict()
        d["report"] = files
        emit_json(d)  # Recommendation.to_dict() carries the document stamp
    else:
        print(candidates_table(rec))
        if files:
            print(f"report: {files['markdown']}")
    return rec.exit_code
