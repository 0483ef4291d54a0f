"""Arguments and steps shared by several subcommands."""
from __future__ import annotations

import argparse
import sys
from typing import Any


def add_model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help="alias, zoo:NAME, Hugging Face id, local folder or .gguf file")
    p.add_argument("--device", default="auto",
                   help="torch device: auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto",
                   help="model dtype: auto (default: the checkpoint's on a GPU; on a CPU bfloat16 for a 16-bit "
                        "checkpoint when the CPU has bf16 instructions, else float32), float32, bfloat16, float16")
    p.add_argument("--trust-remote-code", action="store_true",
                   help="allow Python code shipped with the checkpoint to run (off by default: unsafe)")


def add_eval_args(p: argparse.ArgumentParser, default_data: str = "stdlib-code:eval") -> None:
    p.add_argument("--eval", "--data", dest="eval", default=default_data,
                   help=f"evaluation corpus (default {default_data}; see `advisor ls datasets`)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="evaluate only the first K windows")
    p.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")


def add_protocol_args(p: argparse.ArgumentParser) -> None:
    """The measurement protocol shared by sweep, predict and recommend: the same defaults in all three, so a
    prediction uses the probes and baseline its fitting runs and its verification were measured with."""
    p.add_argument("--calib", default="stdlib-code:calib",
                   help="calibration corpus (default stdlib-code:calib; see `advisor ls datasets`)")
    p.add_argument("--eval", default="stdlib-code:eval",
                   help="evaluation corpus (default stdlib-code:eval; see `advisor ls datasets`)")
    p.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=20, help="evaluation windows (default 20)")
    p.add_argument("--n-calib", type=int, default=16, help="calibration windows (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration window offsets (default 0)")


def protocol_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """What :func:`add_protocol_args` parsed (plus --device and --store), as ``advisor.api.prepare``'s
    keyword arguments: every command passes the whole protocol, none a part of it."""
    out = {k: getattr(args, k) for k in ("calib", "eval", "seq_len", "max_windows", "n_calib", "seed", "store")}
    out["model_options"] = model_options(args)
    return out


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """A memory budget for the weights (plan, recommend): --max-gb or --max-bytes."""
    m = p.add_mutually_exclusive_group()
    m.add_argument("--max-gb", type=float,
                   help="memory budget for the weights in GB (1e9 bytes; KV cache and activations not included)")
    m.add_argument("--max-bytes", type=int, help="memory budget for the weights in bytes")


def memory_budget(args: argparse.Namespace) -> int | None:
    """Bytes from --max-gb / --max-bytes (None: no memory budget); refuses a budget that is not positive."""
    from advisor.models.errors import AdvisorError

    for name, value in (("--max-gb", args.max_gb), ("--max-bytes", args.max_bytes)):
        if value is not None and not value > 0:
            raise AdvisorError(f"{name} must be positive, got {value}")
    return int(args.max_gb * 1e9) if args.max_gb is not None else args.max_bytes


def predictor_from(args: argparse.Namespace):
    """The predictor of ``--predictor PRED.json``, or None: the API then uses the shipped one."""
    if not args.predictor:
        return None
    from advisor.predictor import Predictor

    return Predictor.load(args.predictor)


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print one JSON object on stdout")


def model_options(args: argparse.Namespace):
    """The loader's options from --device, --dtype and --trust-remote-code (every command passes all three)."""
    from advisor.models.loading import ModelOptions

    return ModelOptions(device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code)


def load_model(args: argparse.Namespace, job: str = "load", **kwargs: Any):
    """Load ``--model`` with the command's model options; ``job`` names the work that follows for the
    memory preflight (its sizes come from --seq-len / --n-calib where the command has them)."""
    from advisor.models.loading import load

    params = {k: getattr(args, k) for k in ("seq_len", "n_calib") if getattr(args, k, None) is not None}
    return load(args.model, options=model_options(args), job=job, job_params=params, **kwargs)


def eval_windows_for(loaded, args: argparse.Namespace):
    from advisor.models.data import eval_windows, load_corpus

    corpus = load_corpus(args.eval)
    return eval_windows(loaded.tokenizer, corpus, args.seq_len, args.max_windows,
                        max_context=loaded.adapter.max_context)


def progress_enabled() -> bool:
    return sys.stderr.isatty()


def add_calib_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--calib", default="stdlib-code:calib",
                   help="calibration corpus (default stdlib-code:calib; see `advisor ls datasets`)")
    p.add_argument("--n-calib", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seq-len", type=int, default=None, help="tokens per calibration window (default: --seq-len)")
    p.add_argument("--seed", type=int, default=0, help="seed for calibration window offsets (default 0)")


def calib_windows_for(loaded, args: argparse.Namespace, exclude=None):
    from advisor.models.data import calibration_windows, load_corpus

    corpus = load_corpus(args.calib)
    return calibration_windows(loaded.tokenizer, corpus, args.n_calib, args.calib_seq_len or args.seq_len,
                               seed=args.seed, exclude=exclude, max_context=loaded.adapter.max_context)
