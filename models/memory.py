"""Memory check before loading: estimate what a model (and a quantization run) needs, refuse clearly.

Being killed by the OOM killer half-way through a multi-GB load loses time and says nothing; a
refusal with the estimate says what to do (a smaller --dtype, another machine, fewer windows).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

from advisor.models.errors import AdvisorError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def safetensors_numel(path: Path) -> int:
    """Number of elements in a safetensors file, from its header alone (no tensor is read).

    Raises:
        AdvisorError: a truncated or corrupted header.
    """
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError(f"header size {n}")
            header = json.loads(f.read(n))
    except (struct.error, ValueError, UnicodeDecodeError) as e:
        raise AdvisorError(f"{path} is not a valid safetensors file ({e}); it may be truncated: re-download it") from e
    total = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        numel = 1
        for d in info["shape"]:
            numel *= int(d)
        total += numel
    return total


def gguf_numel(path: Path) -> int:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception as e:  # noqa: BLE001 - any parse failure means a bad file
        raise AdvisorError(f"{path} is not a valid GGUF file ({type(e).__name__}: {e}); it may be truncated") from e
    return int(sum(int(t.n_elements) for t in reader.tensors))


def model_numel(kind: str, target: str | Path) -> int | None:
    """Parameter count from the files of a folder or GGUF (None when it cannot be told without loading)."""
    path = Path(target)
    if kind == "gguf":
        return gguf_numel(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return sum(safetensors_numel(f) for f in files)
    return None


def available_bytes() -> int | None:
    """MemAvailable from /proc/meminfo (None where unknown, e.g. not Linux)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(numel: int | None, bytes_per_param: int, what: str, extra_bytes: int = 0,
               available: int | None = None) -> int | None:
    """Refuse when ``numel * bytes_per_param + extra_bytes`` (plus 20% slack) exceeds available memory.

    Returns:
        the estimate in bytes (None when the parameter count is unknown).
    """
    if numel is None:
        return None
    need = int(numel * bytes_per_param * 1.2) + extra_bytes
    available = available_bytes() if available is None else available
    if available is not None and need > available:
        raise AdvisorError(f"{what} needs about {need / 2**30:.1f} GiB ({numel / 1e9:.2f}B parameters at "
                           f"{bytes_per_param} bytes each, plus working memory) but only {available / 2**30:.1f} GiB "
                           "is available: use --dtype bfloat16, a GPU (--device cuda), or a machine with more memory")
    return need


def quantization_working_bytes(layer_shapes: list[tuple[int, int]], hidden: int, n_windows: int, seq_len: int,
                               needs_hessian: bool, needs_activations: bool) -> int:
    """Working memory a block-sequential quantization run adds to the loaded model (float32).

    - calibration activations: the inputs and outputs of the current block for every window
      (2 x windows x tokens x hidden), only for methods that collect statistics;
    - the Hessian (in x in) of the widest layer and its Cholesky/inverse copies (x3, GPTQ/QuantEase);
    - one layer's weight in float32 three times (original, working copy, dequantized result).
    """
    widest_in = max((i for _, i in layer_shapes), default=0)
    largest = max((o * i for o, i in layer_shapes), default=0)
    need = 3 * largest * 4
    if needs_hessian or needs_activations:
        need += 2 * n_windows * seq_len * hidden * 4
    if needs_hessian:
        need += 3 * widest_in * widest_in * 4
    return need


def check_quantization_fits(model_bytes: int, working_bytes: int, what: str, available: int | None = None) -> int:
    """Refuse a quantization run whose working memory cannot fit beside the loaded model (20% slack)."""
    available = available_bytes() if available is None else available
    need = int(working_bytes * 1.2)
    if available is not None and need > available:
        raise AdvisorError(f"{what} needs about {need / 2**30:.2f} GiB of working memory beside the "
                           f"{model_bytes / 2**30:.2f} GiB model, but only {available / 2**30:.2f} GiB is available: "
                           "use fewer or shorter calibration windows (--n-calib, --seq-len), a GPU, or more memory")
    return need
