"""Memory check before loading: estimate what a model (and a quantization run) needs, refuse clearly.

Being killed by the OOM killer half-way through a multi-GB load loses time and says nothing; a
refusal with the estimate says what to do (a smaller --dtype, another machine, fewer windows).
"""
from __future__ import annotations

import json
import math
import os
import re
import stat
import struct
from pathlib import Path

from advisor.models.errors import AdvisorError, ModelNotFoundError

_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E8M0": 1}
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_CONFIG_BYTES = 16_000_000


def open_regular(path: Path, what: str = "file"):
    """Open ``path`` for reading only if it is a regular file (never a FIFO, device or socket: those hang or
    read forever). The check is made on the opened descriptor, so a swap between check and open is caught.

    Raises:
        AdvisorError: missing, not a regular file, or unreadable.
    """
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as e:
        raise AdvisorError(f"cannot read {what} {path}: {e.strerror or e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise AdvisorError(f"{what} {path} is not a regular file (a FIFO, device or socket); advisor reads model "
                           "files only from regular files: replace it with the real file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def check_regular(path: Path, what: str = "file") -> None:
    with open_regular(path, what):
        pass


def read_safetensors_header(path: Path) -> dict:
    """The validated header of a safetensors file: every entry has a known dtype, a shape of non-negative
    integers and data offsets inside the file that match dtype x shape. Reads at most the header.

    Raises:
        AdvisorError: not a regular file, truncated, or a header that is not a plausible safetensors header.
    """
    def bad(why: str) -> AdvisorError:
        return ModelNotFoundError(f"{path} is not a valid safetensors file ({why}); it may be truncated or corrupted: "
                            "re-download or re-save it")

    with open_regular(path, "weights file") as f:
        size = os.fstat(f.fileno()).st_size
        raw = f.read(8)
        if len(raw) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", raw)
        if n > min(MAX_HEADER_BYTES, size - 8):
            raise bad(f"header length {n} exceeds the file's {size} bytes" if n > size - 8 else f"header length {n}")
        text = f.read(n)
    try:
        header = json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"header is not JSON: {str(e)[:80]}") from e
    if not isinstance(header, dict):
        raise bad(f"header is a JSON {type(header).__name__}, not an object")
    data_size = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict):
                raise bad("__metadata__ is not an object")
            continue
        if not isinstance(info, dict):
            raise bad(f"entry {name[:60]!r} is not an object")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if dtype not in _DTYPE_BYTES:
            raise bad(f"tensor {name[:60]!r} has dtype {str(dtype)[:20]!r}, not one of {', '.join(sorted(_DTYPE_BYTES))}")
        if (not isinstance(shape, list) or len(shape) > 16
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise bad(f"tensor {name[:60]!r} has no valid shape (a list of non-negative integers)")
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_size):
            raise bad(f"tensor {name[:60]!r} has data offsets {str(offsets)[:40]} outside the file's {data_size} data bytes")
        numel = math.prod(shape)
        if numel * _DTYPE_BYTES[dtype] != offsets[1] - offsets[0]:
            raise bad(f"tensor {name[:60]!r}: shape {shape} of {dtype} needs {numel * _DTYPE_BYTES[dtype]} bytes, "
                      f"its offsets span {offsets[1] - offsets[0]}")
    return header


def safetensors_numel(path: Path) -> int:
    """Number of elements in a safetensors file, from its validated header alone (no tensor is read).

    Raises:
        AdvisorError: a truncated or corrupted header, or not a regular file.
    """
    header = read_safetensors_header(path)
    return sum(math.prod(info["shape"]) for name, info in header.items() if name != "__metadata__")


# GGUF value types: fixed sizes in bytes (8 = string, 9 = array are variable)
_GGUF_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


class _Bounded:
    """Reads a file forward, never past its size, never allocating more than what remains."""

    def __init__(self, f, size: int, path: Path):
        self.f, self.size, self.path, self.pos = f, size, path, 0

    def bad(self, why: str) -> AdvisorError:
        return ModelNotFoundError(f"{self.path} is not a valid GGUF file ({why} at byte {self.pos} of {self.size}); it may "
                            "be truncated or corrupted: re-download it")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.bad(f"{what} claims {n} bytes past the end of the file")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.f.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.f.seek(n, 1)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what: str, keep: bool = False) -> str | None:
        n = self.u64(what)
        if keep:
            return self.read(n, what).decode("utf-8", "replace")
        self.skip(n, what)
        return None

    def value(self, vtype: int, what: str, depth: int = 0) -> None:
        if vtype in _GGUF_FIXED:
            self.skip(_GGUF_FIXED[vtype], what)
        elif vtype == _GGUF_STRING:
            self.string(what)
        elif vtype == _GGUF_ARRAY and depth < 4:
            etype, count = self.u32(what), self.u64(what)
            if etype in _GGUF_FIXED:
                self.skip(count * _GGUF_FIXED[etype], f"{what}: array of {count} items")
                return
            # variable-size items take at least 8 bytes each: a count the file cannot hold is refused at once
            self.need(count * 8, f"{what}: array of {count} items")
            for _ in range(count):
                self.value(etype, what, depth + 1)
        else:
            raise self.bad(f"{what} has unknown value type {vtype}")


def gguf_numel(path: Path) -> int:
    """Number of weight elements in a GGUF file, from its header, by a bounded reader: every count and
    length is checked against the bytes left in the file before anything is read or allocated.

    Raises:
        AdvisorError: not a regular file, or a truncated or implausible header.
    """
    with open_regular(path, "GGUF file") as f:
        r = _Bounded(f, os.fstat(f.fileno()).st_size, Path(path))
        if r.read(4, "magic") != b"GGUF":
            raise r.bad("no GGUF magic")
        version = r.u32("version")
        if version not in (2, 3):
            raise r.bad(f"GGUF version {version}; advisor reads versions 2 and 3")
        n_tensors, n_kv = r.u64("tensor count"), r.u64("key-value count")
        r.need(n_kv * 12, f"{n_kv} key-value pairs")  # a key length (8) and a value type (4) at least
        r.need(n_tensors * 24, f"{n_tensors} tensors")
        for i in range(n_kv):
            r.string(f"key {i}")
            r.value(r.u32(f"type of key {i}"), f"value of key {i}")
        total = 0
        for i in range(n_tensors):
            r.string(f"name of tensor {i}")
            n_dims = r.u32(f"dimensions of tensor {i}")
            if n_dims > 8:
                raise r.bad(f"tensor {i} claims {n_dims} dimensions")
            dims = [r.u64(f"shape of tensor {i}") for _ in range(n_dims)]
            r.u32(f"type of tensor {i}")
            r.u64(f"offset of tensor {i}")
            total += math.prod(dims)
        if total > 8 * r.size:  # no GGUF type stores less than one bit per weight
            raise r.bad(f"its tensors claim {total} weights, more than a {r.size}-byte file can hold")
        return total


def read_config(folder: Path) -> dict:
    """config.json of a model folder, bounded in size and checked to be an object.

    Raises:
        AdvisorError: not a regular file, too large, or not a JSON object.
    """
    path = Path(folder) / "config.json"
    with open_regular(path, "config") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_CONFIG_BYTES:
            raise AdvisorError(f"{path} is {size} bytes, too large for a model config (limit {MAX_CONFIG_BYTES})")
        raw = f.read()
    try:
        cfg = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdvisorError(f"{path} is not valid JSON ({str(e)[:80]}): fix or re-download it") from e
    if not isinstance(cfg, dict):
        raise AdvisorError(f"{path} holds a JSON {type(cfg).__name__}, not an object: not a model config")
    return cfg


_LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers")


def _layers_in_weights(names: list[str]) -> int | None:
    """How many decoder blocks the tensor names cover: distinct indices after the blocks' list name."""
    found: set[int] = set()
    for name in names:
        m = re.search(r"(?:^|\.)(?:layers|h|blocks|layer|decoder\.layers)\.(\d+)\.", name)
        if m:
            found.add(int(m.group(1)))
    return len(found) if found else None


def check_config_matches_weights(folder: Path, header_names: list[str]) -> None:
    """Refuse a config.json that contradicts the weights beside it (more layers than the weights hold: the
    rest would be randomly initialised, and a hostile count would make the load grow without bound).

    Raises:
        AdvisorError: names both files and both counts.
    """
    cfg = read_config(folder)
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    claimed = next((text.get(k) for k in _LAYER_KEYS if text.get(k) is not None), None)
    if claimed is None:
        return
    if not isinstance(claimed, int) or isinstance(claimed, bool) or claimed < 1 or claimed > 100_000:
        raise AdvisorError(f"{Path(folder) / 'config.json'}: layer count {claimed!r} is not a plausible number of layers")
    have = _layers_in_weights(header_names)
    if have is not None and claimed > have:
        raise AdvisorError(f"{Path(folder) / 'config.json'} says the model has {claimed} layers but its safetensors "
                           f"weights hold {have}: the config and the weights do not belong together; fix config.json "
                           "or re-download the model")


def model_numel(kind: str, target: str | Path) -> int | None:
    """Parameter count from the files of a folder or GGUF (None when it cannot be told without loading).

    For a folder, the safetensors headers are validated and config.json is checked against them."""
    path = Path(target)
    if kind == "gguf":
        return gguf_numel(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if not files:
        return None
    headers = [read_safetensors_header(f) for f in files]
    names = [n for h in headers for n in h if n != "__metadata__"]
    if (path / "config.json").exists():
        check_config_matches_weights(path, names)
    return sum(math.prod(info["shape"]) for h in headers for n, info in h.items() if n != "__metadata__")


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


# Working memory of each job beyond the weights, per parameter in the load dtype's bytes: what
# benchmarks/memory.py measures (fit of peak against size); the per-token terms below are added on top.
JOB_WEIGHT_FACTOR = {"load": 1.05, "eval": 1.1, "quantize": 1.25, "probe": 1.6, "predict": 1.6, "plan": 1.6,
                     "recommend": 1.7}


def job_peak_bytes(job: str, numel: int, bytes_per_param: int, cfg: dict, seq_len: int = 512, n_calib: int = 16
                   ) -> int:
    """Estimated peak memory of ``job`` on a model of ``numel`` parameters loaded at ``bytes_per_param``.

    The weights times the job's factor (:data:`JOB_WEIGHT_FACTOR`), plus the activations that scale
    with tokens: float32 logits of one window (x3: logits, their float copy, the softmax), and for a
    quantization run the calibration hidden states of one block (inputs and outputs, float32) and the
    widest layer's float32 Hessian with its Cholesky copies."""
    factor = JOB_WEIGHT_FACTOR.get(job, JOB_WEIGHT_FACTOR["recommend"])
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg

    def num(*keys: str) -> int:
        for k in keys:
            v = text.get(k)
            if isinstance(v, int) and not isinstance(v, bool) and v > 0:
                return v
        return 0

    hidden, vocab = num("hidden_size", "n_embd", "d_model"), num("vocab_size")
    inter = num("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size") or 4 * hidden
    need = numel * bytes_per_param * factor + 3 * seq_len * vocab * 4
    if job in ("quantize", "recommend"):
        need += 2 * n_calib * seq_len * hidden * 4 + 3 * max(hidden, inter) ** 2 * 4
    return int(need)


def check_job_fits(name: str, kind: str, local: str | Path, numel: int | None, dtype, device, job: str,
                   params: dict, available: int | None = None) -> int | None:
    """Refuse, before anything is loaded, a job whose estimated peak exceeds the memory of its device.

    The message gives the estimate, what is available, and the option that would fit (bfloat16 weights,
    fewer calibration windows, a GPU) when one would.

    Returns:
        the estimate in bytes (None when the parameter count cannot be told from the files).
    """
    if numel is None:
        return None
    import torch

    cfg: dict = {}
    if kind != "gguf" and (Path(local) / "config.json").exists():
        cfg = read_config(Path(local))
    seq_len, n_calib = int(params.get("seq_len") or 512), int(params.get("n_calib") or 16)
    bpp = torch.finfo(dtype).bits // 8
    need = job_peak_bytes(job, numel, bpp, cfg, seq_len, n_calib)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        available = free if available is None else available
    else:
        available = available_bytes() if available is None else available
    if available is None or need <= available:
        return need
    dname = str(dtype).replace("torch.", "")
    fits = []
    if bpp > 2:
        half = job_peak_bytes(job, numel, 2, cfg, seq_len, n_calib)
        if half <= available:
            fits.append(f"--dtype bfloat16 (about {half / 2**30:.1f} GiB)")
    if job in ("quantize", "recommend") and n_calib > 1:
        fewer = job_peak_bytes(job, numel, bpp, cfg, seq_len, 1)
        if fewer <= available:
            fits.append(f"--n-calib 1 (about {fewer / 2**30:.1f} GiB)")
    if device.type == "cpu":
        fits.append("a GPU with enough memory (--device cuda)")
    fits.append("a machine with more memory")
    where = "GPU memory" if device.type == "cuda" else "memory"
    raise AdvisorError(f"{job} of {name!r} ({numel / 1e9:.2f}B parameters as {dname}) needs about "
                       f"{need / 2**30:.1f} GiB at its peak, but only {available / 2**30:.1f} GiB of {where} is "
                       f"available: use {', or '.join(fits)}")


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
