"""Arguments and steps shared by several subcommands."""
from __future__ import annotations

import argparse
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


def add_protocol_args(p: argparse.ArgumentParser, calib: bool = True) -> None:
    """The measurement protocol's options, identical on every measuring command (advisor.protocol)."""
    from advisor.protocol import add_protocol_args as add

    add(p, calib=calib)


def protocol_from(args: argparse.Namespace):
    """The :class:`advisor.protocol.Protocol` the command line asked for (validated)."""
    from advisor.protocol import Protocol

    return Protocol.from_args(args)


def protocol_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``advisor.api.prepare``'s keywords from the command line: the protocol, the loader's options, the store."""
    return {"protocol": protocol_from(args), "model_options": model_options(args), "store": getattr(args, "store", None)}


def add_memory_args(p: argparse.ArgumentParser) -> None:
    """A memory budget for the weights (plan, recommend): --max-gb or --max-bytes."""
    m = p.add_mutually_exclusive_group()
    m.add_argument("--max-gb", type=float,
                   help="memory budget for the weights in GB (1e9 bytes; KV cache and activations not included)")
    m.add_argument("--max-bytes", type=int, help="memory budget for the weights in bytes")


def memory_budget(args: argparse.Namespace) -> int | None:
    """Bytes from --max-gb / --max-bytes (None: no memory budget); refuses a budget that is not positive."""
    from advisor.models.errors import AdvisorError

    import math

    for name, value in (("--max-gb", args.max_gb), ("--max-bytes", args.max_bytes)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise AdvisorError(f"{name} must be a finite positive number, got {value}")
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


def split_list(s: str | None, option: str = "--methods") -> list[str] | None:
    """A comma-separated option (``--methods gptq,awq``) as a list; None when not given; an error when
    given but naming nothing (``--methods ,``)."""
    if s is None:
        return None
    items = [x.strip() for x in s.split(",") if x.strip()]
    if not items:
        from advisor.models.errors import AdvisorError

        raise AdvisorError(f"{option} {s!r} names nothing; give a comma-separated list, or leave the option out")
    return items
