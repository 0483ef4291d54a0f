"""Save a quantized model folder atomically: weights (safetensors), config, tokenizer, and a JSON record.

The folder is written under a temporary name beside the target and renamed into place, so an
interrupted save never leaves a half-written model where a finished one is expected.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from advisor.models.errors import AdvisorError


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("advisor", "torch", "transformers", "numba", "safetensors"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write a text file via a temporary file in the same folder and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_table(path: str | Path, df) -> Path:
    """Write a pandas DataFrame atomically: parquet when ``path`` ends in ``.parquet``, else CSV (no index)."""
    path = Path(path)
    if path.suffix != ".parquet":
        return atomic_write_text(path, df.to_csv(index=False))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        df.to_parquet(tmp, index=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def check_output_dir(out_dir: str | Path, option: str = "--out") -> Path:
    """Fail early (before hours of work) if ``out_dir`` (a folder, or a file: the same check) cannot be
    created and written; ``option`` names the command-line option in the message.

    Creates the folder's parent and a probe file in it, then removes the probe.
    Raises:
        AdvisorError: not writable (permissions, read-only filesystem, a file in the way).
    """
    out_dir = Path(out_dir).expanduser().resolve()
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=out_dir.parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise AdvisorError(f"output {out_dir} is not writable ({e.strerror or e}); choose another {option}") from e
    return out_dir


def save_quantized_model(loaded, result, record: dict[str, Any], out_dir: str | Path) -> Path:
    """Write ``out_dir`` = model.safetensors + config.json + tokenizer + quantization.json, atomically.

    Raises:
        AdvisorError: the parent folder is not writable or the disk is full (nothing is left behind).
    """
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    out_dir = Path(out_dir).expanduser().resolve()
    parent = out_dir.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=parent))
    except OSError as e:
        raise AdvisorError(f"cannot write the output folder {out_dir}: {e.strerror or e}. "
                           "Choose a writable --out") from e
    try:
        metadata = {"format": "pt", "advisor_spec": str(result.spec),
                    "advisor_bits_per_weight": f"{result.bits_per_weight:.6f}"}
        save_model(loaded.model, str(tmp / "model.safetensors"), metadata=metadata)
        loaded.model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        full = dict(record, quantization=result.to_dict(), versions=package_versions())
        (tmp / "quantization.json").write_text(json.dumps(full, indent=2, default=str))
        if out_dir.exists():
            backup = parent / f".{out_dir.name}.old"
            shutil.rmtree(backup, ignore_errors=True)
            os.replace(out_dir, backup)
            os.replace(tmp, out_dir)
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    except (OSError, SafetensorError) as e:  # safetensors reports I/O errors (disk full) as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        raise AdvisorError(f"could not save the quantized model to {out_dir}: {getattr(e, 'strerror', None) or e} "
                           "(disk full or not writable?); nothing was left behind") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
