"""`advisor recommend`: the main job. Exit 0 verified, 2 nothing predicted to meet the target, 3 none verified,
4 the exported artifact (--verify-export) measured outside the tolerance of advisor's measurement."""
from __future__ import annotations

import argparse


def add_parser(p: argparse.ArgumentParser) -> None:
    from advisor.commands._common import add_json_arg, add_memory_args, add_model_args, add_protocol_args

    add_model_args(p)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--max-ppl-delta", type=float, help="largest allowed perplexity increase (absolute)")
    g.add_argument("--max-ppl-ratio", type=float, help="largest allowed ppl_q / ppl_fp, e.g. 1.03")
    g.add_argument("--max-kld", type=float,
                   help="largest allowed mean KL divergence from the baseline, nats per token; measured, not "
                        "predicted: candidates are ranked by predicted dL as its stand-in (docs/recommend.md)")
    add_memory_args(p)
    p.add_argument("--confidence", type=float, default=0.9,
                   help="coverage of the interval whose upper bound must meet the budget for the first "
                        "choice and escalations (default 0.9)")
    p.add_argument("--no-explore", action="store_true",
                   help="stop at the first verified candidate (default: attempts left then try cheaper "
                        "candidates whose median prediction meets the budget)")
    p.add_argument("--no-early-stop", action="store_true",
                   help="measure every protocol window before deciding (default: the sequential test may pass "
                        "or miss a candidate after a quarter, half or three quarters of them; docs/recommend.md)")
    p.add_argument("--methods", default=None, help="comma-separated methods to consider (default all)")
    p.add_argument("--dtypes", default=None, help="comma-separated data types to consider (default all)")
    p.add_argument("--specs", nargs="+", default=None,
                   help="the candidates, any formats (e.g. rtn:fp6_e3m2:g128 gptq:int3:g256); default: the default "
                        "grid, filtered by --methods/--dtypes")
    p.add_argument("--max-attempts", type=int, default=3, help="candidates to try before giving up (default 3)")
    add_protocol_args(p)
    p.add_argument("--store", default=None, help="measurement store (default ADVISOR_HOME/measurements.sqlite)")
    p.add_argument("--predictor", default=None, help="predictor JSON from `advisor fit` (default: shipped)")
    p.add_argument("--out", default=None,
                   help="report folder (markdown, JSON, PNG, the packed model in OUT/model, the export in OUT/FORMAT)")
    p.add_argument("--force", action="store_true",
                   help="write into an existing folder advisor did not create; only the files advisor writes are "
                        "replaced (a file of yours with one of those names is refused)")
    p.add_argument("--verify-export", default=None, metavar="FORMAT", choices=("compressed-tensors", "gguf"),
                   help="consider only specs FORMAT holds exactly, export the verified model as FORMAT, load it with "
                        "the format's own loader (transformers) and measure it on the same windows; the two "
                        "perplexities must agree within 0.1%% (exit 4 otherwise)")
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
    rec = recommend(args.model, args.max_ppl_delta, max_ppl_ratio=args.max_ppl_ratio, max_kld=args.max_kld,
                    confidence=args.confidence, explore=not args.no_explore, early_stop=not args.no_early_stop,
                    methods=split_list(args.methods), dtypes=split_list(args.dtypes, "--dtypes"),
                    specs=args.specs, max_attempts=args.max_attempts,
                    out=args.out, dry_run=args.dry_run, predictor=predictor, max_bytes=max_bytes,
                    verify_export=args.verify_export, force=args.force, **protocol_kwargs(args))
    files = write_report(rec, args.out) if args.out else {}
    if args.json:
        d = rec.to_dict()
        d["report"] = files
        emit_json(d)  # Recommendation.to_dict() carries the document stamp
    else:
        print(candidates_table(rec))
        if files:
            print(f"report: {files['markdown']}")
    if rec.exit_code == 4:
        import sys

        print(f"error: {rec.message}", file=sys.stderr)
    return rec.exit_code
