"""What the ``rtn_loss`` precision buys the predictor: its held-out figures when every RTN-loss measurement
of the shipped runs is made as if on a fraction of its windows.

    python benchmarks/predictor_rtn_precision.py [--fraction 0.25] [--seed 0]

A measurement on a fraction ``f`` of its windows has standard error ``se / sqrt(f)``; the script draws,
once per (model, format), the extra noise ``N(0, se^2 (1/f - 1))``, adds it to ``rtn_dl``, sets
``rtn_dl_se`` accordingly, and runs ``advisor fit --report --json`` on the original and on the noisier
runs (``advisor/data/runs.csv``). Leave-one-family-out (zoo) and transfer (SmolLM2) figures side by side.
Writes benchmarks/results/predictor_rtn_precision.json.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = ROOT / "advisor" / "data" / "runs.csv"
FIGURES = ("median_abs_err_dl", "median_rel_err_dl", "spearman", "coverage90", "within_target")


def report(runs: Path) -> dict:
    out = subprocess.run([sys.executable, "-m", "advisor.cli", "fit", "--runs", str(runs), "--report", "--json"],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)


def noisier(runs: Path, fraction: float, seed: int, dest: Path) -> None:
    import numpy as np
    import pandas as pd

    d = pd.read_csv(runs)
    key = d["model"] + "|" + d["dtype"].astype(str) + "|" + d["group_size"].astype(str)
    rng = np.random.default_rng(seed)
    z = key.map({k: rng.standard_normal() for k in key.unique()}).to_numpy()
    se = d["rtn_dl_se"].to_numpy(float)
    d["rtn_dl"] = d["rtn_dl"].to_numpy(float) + z * se * np.sqrt(1 / fraction - 1)
    d["rtn_dl_se"] = se / np.sqrt(fraction)
    d.to_csv(dest, index=False)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fraction", type=float, default=0.25, help="share of the windows (default 0.25: 2 of 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "predictor_rtn_precision.json"))
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        fewer = Path(tmp) / "runs.csv"
        noisier(RUNS, args.fraction, args.seed, fewer)
        shipped, cut = report(RUNS), report(fewer)
    out = {"command": "python benchmarks/predictor_rtn_precision.py " + " ".join(argv or sys.argv[1:]),
           "fraction": args.fraction, "seed": args.seed,
           "figures": {split: {f: {"shipped": shipped[split][f], "fewer_windows": cut[split][f]} for f in FIGURES}
                       for split in ("lofo", "transfer")}}
    Path(args.out).write_text(json.dumps(out, indent=2))
    for split, rows in out["figures"].items():
        for f, v in rows.items():
            print(f"{split:9s} {f:20s} shipped {v['shipped']:.4f}  "
                  f"{args.fraction:.2f} of the windows {v['fewer_windows']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
