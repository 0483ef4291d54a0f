"""`advisor zoo train|list`: build and list the project's own small model families (docs/zoo.md)."""
from __future__ import annotations

import argparse
import sys
from typing import Any

LIST_FIELDS = ("name", "family", "size", "variant", "params", "non_embedding_params", "train_tokens",
               "train_seconds", "eval_ppl", "unigram_ppl", "seed", "present")


def add_parser(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="zoo_command", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train zoo models from their recipes (resumable)",
                       description="Train zoo models into ADVISOR_HOME/zoo/<name>/ from their recorded recipes. "
                       "--name retrains that model; --family/--size/--all build what is missing (--force: all).")
    t.add_argument("--name", action="append", help="a zoo model, e.g. llama-s or gpt2-m-short (repeatable); "
                   "always retrains it")
    t.add_argument("--family", help="llama, gpt2 or opt (with --size or alone: every size, both lengths)")
    t.add_argument("--size", help="xs, s, m or l (with --family or alone: every family)")
    t.add_argument("--all", action="store_true", help="every zoo model")
    t.add_argument("--force", action="store_true", help="retrain models that are already present")
    t.add_argument("--jobs", type=int, default=None,
                   help="models trained at once, each in its own single-threaded process (default: the number "
                   "of CPU cores, at most 4; results do not depend on it)")
    t.add_argument("--threads", type=int, default=None,
                   help="override the recipe's thread count (1): faster alone, but not bitwise reproducible")
    t.add_argument("--write-manifest", action="store_true",
                   help="maintainers: record the measured results in the package manifest (and refresh the "
                   "embedded default when llama-xs is trained)")
    t.add_argument("--json", action="store_true", help="print one JSON list of results on stdout")
    ls = sub.add_parser("list", help="the zoo's models with their recorded results and whether they are present")
    ls.add_argument("--json", action="store_true", help="print one JSON list on stdout")


def list_rows() -> list[dict[str, Any]]:
    """Every zoo model: recorded manifest numbers (None when never recorded) and local presence."""
    from advisor.models.zoo import zoo_names
    from advisor.models.zoo.build import is_present, model_dir
    from advisor.models.zoo.manifest import manifest_models
    from advisor.models.zoo.resolve import recipe_for

    recorded = manifest_models()
    rows = []
    for name in zoo_names():
        r = recipe_for(name)
        m = recorded.get(name, {})
        row = {k: m.get(k) for k in LIST_FIELDS}
        row.update(name=name, family=r.family, size=r.size, variant=r.variant, seed=r.seed,
                   present=is_present(model_dir(name)))
        if row["train_tokens"] is None:
            row["train_tokens"] = r.train_tokens
        rows.append(row)
    return rows


def _selected(args: argparse.Namespace) -> tuple[list[str], bool]:
    """(names, explicit): explicit names are always retrained."""
    from advisor.models.errors import AdvisorError, unknown_key_message
    from advisor.models.zoo import zoo_names
    from advisor.models.zoo.configs import FAMILY_NAMES, SIZES
    from advisor.models.zoo.resolve import recipe_for

    names = zoo_names()
    if args.name:
        for n in args.name:
            if n not in names:
                raise AdvisorError(unknown_key_message("zoo model", n, names))
        return list(args.name), True
    if args.family and args.family not in FAMILY_NAMES:
        raise AdvisorError(unknown_key_message("zoo family", args.family, FAMILY_NAMES))
    if args.size and args.size not in SIZES:
        raise AdvisorError(unknown_key_message("zoo size", args.size, SIZES))
    if not (args.all or args.family or args.size):
        raise AdvisorError("say what to train: --name NAME, --family F and/or --size S, or --all "
                           "(see `advisor zoo list`)")
    picked = [n for n in names
              if (not args.family or recipe_for(n).family == args.family)
              and (not args.size or recipe_for(n).size == args.size)]
    return picked, False


def _fmt_row(row: dict[str, Any]) -> str:
    ppl = f"{row['eval_ppl']:.2f}" if row.get("eval_ppl") is not None else "-"
    uni = f"{row['unigram_ppl']:.1f}" if row.get("unigram_ppl") is not None else "-"
    params = f"{row['params'] / 1e6:.2f}M/{row['non_embedding_params'] / 1e6:.2f}M" if row.get("params") else "-"
    secs = f"{row['train_seconds']:.0f}s" if row.get("train_seconds") is not None else "-"
    return (f"{row['name']:<16} {row['family']:<6} {params:>14} {row['train_tokens'] / 1e6:>6.2f}M {secs:>6} "
            f"{ppl:>8} {uni:>8}  {'yes' if row['present'] else 'no'}")


def run(args: argparse.Namespace) -> int:
    from advisor.cli import emit_json

    if args.zoo_command == "list":
        rows = list_rows()
        if args.json:
            emit_json(rows)
            return 0
        print(f"{'name':<16} {'family':<6} {'params/non-emb':>14} {'tokens':>7} {'train':>6} {'ppl':>8} "
              f"{'unigram':>8}  present")
        for row in rows:
            print(_fmt_row(row))
        print("ppl: stdlib-code eval part, first 40 windows of 512 tokens (docs/zoo.md); present: weights in "
              "ADVISOR_HOME/zoo")
        return 0

    from advisor.models.zoo.build import build
    from advisor.models.zoo.manifest import manifest_models
    from advisor.models.zoo.resolve import recipe_for

    names, explicit = _selected(args)
    recipes = [recipe_for(n) for n in names]
    recorded = manifest_models()
    if args.jobs is None:
        import os

        args.jobs = max(1, min(4, os.cpu_count() or 1, len(recipes)))
    if args.jobs < 1:
        from advisor.models.errors import AdvisorError

        raise AdvisorError(f"--jobs must be positive, got {args.jobs}")
    progress = True  # tqdm on stderr; refreshed every 30 s when stderr is a log file

    def report(entry: dict[str, Any]) -> None:
        if args.json:
            return
        before = recorded.get(entry["name"], {}).get("eval_ppl")
        diff = f" (recorded {before:.3f}, {100 * (entry['eval_ppl'] / before - 1):+.2f}%)" if before else ""
        verb = "already present" if entry["status"] == "present" else f"trained in {entry['train_seconds']:.0f}s"
        print(f"{entry['name']}: {verb}, eval ppl {entry['eval_ppl']:.3f}{diff}, unigram {entry['unigram_ppl']:.1f} "
              f"-> {entry['path']}", file=sys.stderr if args.json else sys.stdout, flush=True)

    results = build(recipes, force=args.force or explicit, jobs=args.jobs, progress=progress,
                    threads=args.threads, write_manifest=args.write_manifest, on_result=report)
    if args.json:
        out = []
        for e in results:
            before = recorded.get(e["name"], {}).get("eval_ppl")
            out.append({"name": e["name"], "status": e["status"], "path": e["path"], "eval_ppl": e["eval_ppl"],
                        "recorded_eval_ppl": before,
                        "relative_diff": (e["eval_ppl"] / before - 1) if before else None,
                        "weights_sha256": e.get("weights_sha256"),
                        "recorded_weights_sha256": recorded.get(e["name"], {}).get("weights_sha256"),
                        "train_seconds": e.get("train_seconds")})
        emit_json(out)
    return 0
