"""Save and load packed layers as one safetensors file (configs + metadata in its JSON header), and the
one atomic-write helper every writer in the package uses."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

from .linear import QuantLinear

FORMAT = "advisor.kernels/1"
TMP_TAG = ".tmp-"  # temporaries are ".<name>.tmp-<pid>-<random>" beside their target


class NotRegularFileError(OSError):
    """The target exists and is neither a regular file nor (for folders) a directory: never replaced."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | Path) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>-*`` leftovers of ``path`` whose writing process is gone.

    Only regular files and real directories are removed (never a symlink's target, a FIFO or a device);
    a temporary of a process that is still running is left alone. Returns what was removed.
    """
    path = Path(path)
    removed = []
    prefix = f".{path.name}{TMP_TAG}"
    try:
        entries = list(path.parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        if not entry.name.startswith(prefix):
            continue
        pid_text = entry.name[len(prefix):].split("-", 1)[0]
        if pid_text.isdigit() and _pid_alive(int(pid_text)) and int(pid_text) != os.getpid():
            continue
        try:
            mode = entry.lstat().st_mode
            if stat.S_ISREG(mode):
                entry.unlink()
            elif stat.S_ISDIR(mode):
                shutil.rmtree(entry)
            else:
                continue
            removed.append(entry)
        except OSError:
            pass
    return removed


def temporary_name(path: str | Path) -> Path:
    """A fresh temporary path beside ``path`` (not created), named so that a later run can tell its
    writer is gone (:func:`clean_stale_temporaries`)."""
    path = Path(path)
    return path.parent / f".{path.name}{TMP_TAG}{os.getpid()}-{os.urandom(4).hex()}"


@contextlib.contextmanager
def atomic_path(path: str | Path, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path``; when the block succeeds it is fsynced and renamed onto
    ``path`` (``os.replace``: readers see the old file or the new one, never half of one); when it fails
    the temporary is removed.

    The caller writes the file at the yielded path (any library that takes a file name). An existing
    ``path`` that is not a regular file (a directory, FIFO, device) is refused with
    :class:`NotRegularFileError`; a symbolic link is replaced as a link, never followed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() is False and path.exists() and not path.is_file():
        raise NotRegularFileError(f"{path} exists and is not a regular file; it is left untouched")
    clean_stale_temporaries(path)
    tmp = temporary_name(path)
    try:
        yield tmp
        if fsync and tmp.is_file():
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "xb") as f:
            f.write(data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically (see :func:`atomic_path`)."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _atomic_save(tensors: dict[str, torch.Tensor], path: str, header: dict[str, str]) -> None:
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=header)


def quantized_state(modules: dict[str, QuantLinear]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Every module's buffers as ``<name>.<buffer>`` tensors, and the modules' configs by name."""
    tensors, configs = {}, {}
    for name, mod in modules.items():
        configs[name] = mod.config
        for key, buf in mod.state_dict().items():
            tensors[f"{name}.{key}"] = buf.detach().cpu().contiguous()
    return tensors, configs


def save_quantized(path: str, modules: dict[str, QuantLinear], metadata: dict[str, Any],
                   extra_tensors: dict[str, torch.Tensor] | None = None) -> None:
    """Write every module's buffers as ``<name>.<buffer>`` plus their configs and ``metadata``.

    Args:
        path: target ``.safetensors`` file (written to a temp file, then ``os.replace``).
        modules: module name (e.g. ``model.layers.0.mlp.up_proj``) -> QuantLinear.
        metadata: JSON-serializable dict (spec, provenance, ...).
        extra_tensors: other tensors stored as they are (a model's embeddings, norms, head); their
            names must not collide with the modules' buffers.
    """
    tensors, configs = quantized_state(modules)
    for key, t in (extra_tensors or {}).items():
        if key in tensors:
            raise ValueError(f"tensor {key!r} is both a packed buffer and an extra tensor")
        tensors[key] = t.detach().cpu().contiguous()
    header = {"format": FORMAT, "modules": json.dumps(configs, sort_keys=True),
              "metadata": json.dumps(metadata, sort_keys=True)}
    _atomic_save(tensors, path, header)


def load_quantized_file(path: str) -> tuple[dict[str, QuantLinear], dict[str, torch.Tensor], dict[str, Any]]:
    """Inverse of :func:`save_quantized` with its extra tensors -> (modules, extra tensors, metadata).

    Raises:
        ValueError: not a file of this format, or a module's buffers missing, misshapen or unexpected.
    """
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        header = f.metadata() or {}
        if header.get("format") != FORMAT:
            raise ValueError(f"{path}: not a {FORMAT} file (format={header.get('format')!r})")
        configs = json.loads(header["modules"])
        keys = set(f.keys())
        modules = {}
        for name, config in configs.items():
            mod = QuantLinear(config)
            want = {f"{name}.{key}" for key in mod.state_dict()}
            missing = sorted(want - keys)
            if missing:
                raise ValueError(f"{path}: layer {name} lacks {', '.join(missing)}")
            state = {key: f.get_tensor(f"{name}.{key}") for key in mod.state_dict()}
            for key, t in state.items():
                expect = mod.state_dict()[key]
                if t.shape != expect.shape or t.dtype != expect.dtype:
                    raise ValueError(f"{path}: {name}.{key} is {t.dtype} {tuple(t.shape)}, its layer "
                                     f"config says {expect.dtype} {tuple(expect.shape)}")
            mod.load_state_dict(state)
            modules[name] = mod
            keys -= want
        extra = {key: f.get_tensor(key) for key in sorted(keys)}
    return modules, extra, json.loads(header["metadata"])


def load_quantized(path: str) -> tuple[dict[str, QuantLinear], dict[str, Any]]:
    """Inverse of :func:`save_quantized` -> (modules by name, metadata)."""
    modules, _, metadata = load_quantized_file(path)
    return modules, metadata
