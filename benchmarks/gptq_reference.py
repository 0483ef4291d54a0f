"""Our GPTQ against the authors' reference implementation (IST-DASLab/gptq), side by side.

The reference code is read at run time from a git mirror of IST-DASLab/gptq (e.g. obtained with the
``fetch`` tool): ``gptq.py`` and ``quant.py`` are extracted with ``git show`` into a temporary
directory outside the repository and imported from there; nothing of theirs is copied into the project.

Both run on the same weight and the same Hessian (a synthetic layer with correlated inputs and outlier
channels, ``quantizers.synthetic``), asymmetric min-max integers (the reference's default
``Quantizer(perchannel=True, sym=False, mse=False)``), 1 % damping, lazy blocks of 128, no act-order,
float32 scales (the reference's; our stored format rounds scales to fp16, reported separately).

Prints and writes ``benchmarks/results/gptq_reference.json``: fraction of identical codes, relative
reconstruction errors ``tr(E H E^T) / tr(W H W^T)``, and the time ratio ours / theirs (best of N,
interleaved, same thread count).

    .venv/bin/python benchmarks/gptq_reference.py --mirror /work/.mirror/IST-DASLab+gptq/repo
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import advisor.quantizers as q
from advisor.quantizers.gptq import gptq_quantize_weight
from advisor.quantizers.synthetic import synthetic_layer

CASES = [  # (out, in, bits, group)  group None = per output channel
    (768, 768, 4, None), (768, 768, 4, 128), (576, 1536, 4, None), (576, 1536, 4, 128),
    (768, 768, 3, 128), (576, 1536, 3, 128),
]


def load_reference(mirror: str, workdir: Path):
    """Extract gptq.py and quant.py from the mirror into ``workdir`` and import them."""
    for name in ("gptq.py", "quant.py"):
        text = subprocess.run(["git", f"--git-dir={mirror}", "show", f"HEAD:{name}"], check=True,
                              capture_output=True, text=True).stdout
        (workdir / name).write_text(text)
    commit = subprocess.run(["git", f"--git-dir={mirror}", "rev-parse", "HEAD"], check=True,
                            capture_output=True, text=True).stdout.strip()
    sys.path.insert(0, str(workdir))
    with contextlib.redirect_stdout(io.StringIO()):  # quant.py prints when its CUDA extension is absent
        ref_gptq = importlib.import_module("gptq")
        ref_quant = importlib.import_module("quant")
    if not torch.cuda.is_available():
        torch.cuda.synchronize = lambda *a, **k: None  # the reference calls it unconditionally
    return ref_gptq, ref_quant, commit


def run_reference(ref_gptq, ref_quant, W, H, bits, group):
    layer = torch.nn.Linear(W.shape[1], W.shape[0], bias=False)
    layer.weight.data = W.clone()
    g = ref_gptq.GPTQ(layer)
    g.H = H.clone()
    g.quantizer = ref_quant.Quantizer()
    g.quantizer.configure(bits, perchannel=True, sym=False, mse=False)
    with contextlib.redirect_stdout(io.StringIO()):
        t = time.perf_counter()
        g.fasterquant(blocksize=128, percdamp=0.01, groupsize=group or -1, actorder=False)
        dt = time.perf_counter() - t
    return layer.weight.data.clone(), dt


def run_ours(W, H, bits, group, scale_dtype):
    t = time.perf_counter()
    codes, params, Q = gptq_quantize_weight(W, H, q.get_dtype(f"int{bits}"), group, symmetric=False,
                                            scale_dtype=scale_dtype)
    return codes, params, Q, time.perf_counter() - t


def rel_error(W, Wh, H):
    return q.layer_error(W, Wh, H) / q.layer_error(W, torch.zeros_like(W), H)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mirror", required=True, help="git dir of a fetched IST-DASLab/gptq mirror")
    ap.add_argument("--repeats", type=int, default=3, help="timing repeats (best of)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "gptq_reference.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="gptq_ref_") as tmp:
        ref_gptq, ref_quant, commit = load_reference(args.mirror, Path(tmp))
        rows = []
        header = (f"{'shape':>10} {'bits':>4} {'group':>5} {'same codes':>10} {'err ours':>9} {'err theirs':>10} "
                  f"{'err ours fp16':>13} {'t ours':>7} {'t theirs':>8} {'ratio':>6}")
        print(header)
        for out, inp, bits, group in CASES:
            W, stats, _ = synthetic_layer(out, inp, seed=out + inp + bits)
            H = stats.H
            t_ours, t_theirs = [], []
            for _ in range(args.repeats):  # interleaved so both see the same machine load
                Qr, dt = run_reference(ref_gptq, ref_quant, W, H, bits, group)
                t_theirs.append(dt)
                codes, params, Q, dt = run_ours(W, H, bits, group, torch.float32)
                t_ours.append(dt)
            _, _, Q16, _ = run_ours(W, H, bits, group, torch.float16)
            gs = params.group_size
            scale = params.scales.repeat_interleave(gs, dim=1)[:, :inp]
            same = float(((Q - Qr).abs() < 0.5 * scale).float().mean())
            row = {
                "out": out, "in": inp, "bits": bits, "group_size": group,
                "fraction_identical_codes": same,
                "max_abs_diff_dequantized": float((Q - Qr).abs().max()),
                "rel_error_ours": rel_error(W, Q, H), "rel_error_theirs": rel_error(W, Qr, H),
                "rel_error_ours_fp16_scales": rel_error(W, Q16, H),
                "seconds_ours": min(t_ours), "seconds_theirs": min(t_theirs),
                "time_ratio_ours_over_theirs": min(t_ours) / min(t_theirs),
            }
            rows.append(row)
            print(f"{out}x{inp:>5} {bits:>4} {str(group or '-'):>5} {same:>10.6f} {row['rel_error_ours']:>9.6f} "
                  f"{row['rel_error_theirs']:>10.6f} {row['rel_error_ours_fp16_scales']:>13.6f} "
                  f"{row['seconds_ours']:>7.3f} {row['seconds_theirs']:>8.3f} "
                  f"{row['time_ratio_ours_over_theirs']:>6.2f}")
    result = {
        "benchmark": "gptq_reference",
        "reference": {"repo": "IST-DASLab/gptq", "commit": commit, "files": ["gptq.py", "quant.py"]},
        "protocol": {"quantizer": "asymmetric min-max int (reference Quantizer sym=False, mse=False)",
                     "damp": 0.01, "blocksize": 128, "act_order": False, "scales": "float32",
                     "hessian": "synthetic correlated inputs with outlier channels, H = sum x x^T",
                     "timing": f"best of {args.repeats}, interleaved, torch threads={args.threads}",
                     "device": "cpu"},
        "command": "benchmarks/gptq_reference.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
