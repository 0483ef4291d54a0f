"""Output files and folders that never destroy what advisor did not write, and the native packed format.

Every output advisor writes (a native model folder, an export folder, a ``.gguf`` file) is recognised
later by its manifest: a folder holds ``advisor-manifest.json`` naming the files advisor wrote; an
advisor GGUF file carries ``advisor.*`` keys. Rules (:func:`check_output`, run before any work):

- a path that does not exist, an empty folder, or an advisor output of the same shape is written;
- an existing folder that is not an advisor output is refused unless ``force``; even then only the
  files advisor writes are replaced and the user's other files stay;
- an existing file that is not an advisor output is refused unless ``force``;
- a symbolic link, FIFO, device or socket is never followed, moved or replaced.

A folder is built under ``.<name>.tmp-<pid>-<random>`` beside the target and then swapped in whole
(an advisor folder) or file by file (a folder with the user's files in it, each file with
``os.replace``); leftovers of an interrupted write (``.<name>.tmp-*`` of a dead process,
``.<name>.old``) are removed by the next write of the same target.

The native format (``kind = "native"``): ``advisor-model.safetensors`` (the packed ``QuantLinear``
buffers and configs, :mod:`advisor.kernels.io`, plus every other tensor in the narrowest float type
that holds it exactly), ``config.json``, the tokenizer, ``quantization.json`` (the measured record)
and the manifest. :func:`advisor.models.native.load_native` loads it back as the packed model.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
from pathlib import Path
from typing import Any, Callable

import torch

from advisor.kernels.io import atomic_path, atomic_write_text, clean_stale_temporaries, temporary_name
from advisor.models.errors import AdvisorError

__all__ = ["MANIFEST", "NATIVE_WEIGHTS", "REPORT_FILES", "REPORT_NAMES", "atomic_write_text", "atomic_write_table",
           "check_output", "check_output_dir", "claim_report_folder", "write_output_folder", "save_quantized_model", "storage_dtype",
           "stored_bytes", "read_manifest"]

MANIFEST = "advisor-manifest.json"
NATIVE_WEIGHTS = "advisor-model.safetensors"
GGUF_MARKER = b"advisor.spec"  # a key every GGUF advisor writes
# names advisor's folder outputs may hold: --force never lets them replace a user's file of that name
WRITTEN_NAMES = frozenset({MANIFEST, NATIVE_WEIGHTS, "model.safetensors", "config.json", "quantization.json",
                           "quantize_config.json", "generation_config.json", "tokenizer.json",
                           "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                           "vocab.json", "merges.txt", "tokenizer.model", "added_tokens.json"})
# what `recommend --out R` writes in R: the report's files, the native model and the exports' folders
REPORT_FILES = ("recommendation.json", "report.md", "dppl_vs_bits.png")
REPORT_NAMES = frozenset({MANIFEST, *REPORT_FILES, "model", "compressed-tensors", "gguf"})


def package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("advisor", "torch", "transformers", "numba", "safetensors", "compressed-tensors", "gguf"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def atomic_write_table(path: str | Path, df) -> Path:
    """Write a pandas DataFrame atomically: parquet when ``path`` ends in ``.parquet``, else CSV (no index)."""
    path = Path(path)
    if path.suffix != ".parquet":
        return atomic_write_text(path, df.to_csv(index=False))
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)
    return path


# --------------------------------------------------------------------------------------------- dtypes
def storage_dtype(t: torch.Tensor) -> torch.dtype:
    """The narrowest of bfloat16, float16, float32 that holds every value of float tensor ``t`` exactly."""
    if not t.is_floating_point() or t.dtype in (torch.bfloat16, torch.float16):
        return t.dtype
    for dt in (torch.bfloat16, torch.float16):
        with contextlib.suppress(RuntimeError):
            if torch.equal(t.to(dt).to(t.dtype), t):
                return dt
    return torch.float32 if t.dtype != torch.float64 else t.dtype


def stored_bytes(t: torch.Tensor) -> int:
    """Bytes ``t`` takes in an advisor output (:func:`storage_dtype`)."""
    return t.numel() * torch.empty((), dtype=storage_dtype(t)).element_size()


# ------------------------------------------------------------------------------------- output checks
def _kind_of(p: Path) -> str:
    try:
        mode = p.lstat().st_mode
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:  # a parent folder is a file
        return "under-a-file"
    if stat.S_ISLNK(mode):
        return "symlink"
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    return "special"


def read_manifest(folder: str | Path) -> dict[str, Any] | None:
    """The manifest of an advisor output folder, or None when ``folder`` is not one."""
    path = Path(folder) / MANIFEST
    if _kind_of(path) != "file" or path.stat().st_size > 1 << 20:
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("files"), dict) or "advisor_output" not in data:
        return None
    return data


def _is_advisor_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 20)
    except OSError:
        return False
    return head[:4] == b"GGUF" and GGUF_MARKER in head


def check_output(out: str | Path, option: str = "--out", *, force: bool = False, file: bool = False,
                 names: frozenset[str] = WRITTEN_NAMES) -> Path:
    """Validate an output path before any work (see the module docstring for the rules).

    Args:
        out: the path the user gave.
        option: the command-line option, named in messages.
        force: allow writing into a folder (or over a file) advisor did not create; only advisor's own
            files are replaced.
        file: the output is one file (a ``.gguf``), not a folder.
        names: the names advisor may write in the folder; with ``force``, a user's file or folder of one
            of these names is refused rather than replaced.
    Returns:
        the absolute path (symbolic links in its parent folders resolved; the last part never followed).
    Raises:
        AdvisorError: refused, with the user's path and what to do.
    """
    if str(out).strip() == "":
        raise AdvisorError(f"{option} is empty; give a path")
    given = Path(out).expanduser()
    target = given.parent.resolve() / given.name if given.name not in ("", ".", "..") else given.resolve()
    kind = _kind_of(target)
    if kind == "under-a-file":
        raise AdvisorError(f"{option} {out} is not writable: a folder on its path is an existing file; "
                           f"choose another {option}")
    if kind == "symlink":
        raise AdvisorError(f"{option} {out} is a symbolic link; advisor does not write through links. "
                           "Give the real path")
    if kind == "special":
        raise AdvisorError(f"{option} {out} is not a regular file or folder (a device, FIFO or socket); "
                           "it is left untouched. Choose another path")
    if file:
        if kind == "dir":
            raise AdvisorError(f"{option} {out} is a folder; give a file name ending in .gguf, or a folder "
                               "that does not exist yet")
        if kind == "file" and not force and not _is_advisor_gguf(target):
            raise AdvisorError(f"{option} {out} exists and was not written by advisor; it is left untouched. "
                               "Choose another path, or pass --force to replace it")
    else:
        if kind == "file":
            raise AdvisorError(f"{option} {out} is an existing file; give a folder path")
        if kind == "dir" and read_manifest(target) is None:
            try:
                entries = [e.name for e in target.iterdir()]
            except OSError as e:
                raise AdvisorError(f"{option} {out} cannot be read ({e.strerror or e}); choose another path") from e
            clash = sorted(n for n in entries if n in names or n.endswith(".gguf"))
            if entries and force and clash:
                raise AdvisorError(f"{option} {out} already holds {clash[0]}, which advisor did not write and would "
                                   "replace; nothing was written. Move it, or choose another path")
            if entries and not force:
                raise AdvisorError(
                    f"{option} {out} is a folder advisor did not create (it holds {len(entries)} entries, e.g. "
                    f"{sorted(entries)[0]!r}); nothing was written. Choose a new or empty folder, or pass "
                    "--force to add advisor's files to it (only those are replaced)")
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(parent / ".write-test")
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as e:
        raise AdvisorError(f"{option} {out} is not writable ({e.strerror or e}); choose another {option}") from e
    return target


def check_output_dir(out_dir: str | Path, option: str = "--out", force: bool = False,
                     names: frozenset[str] = WRITTEN_NAMES) -> Path:
    """:func:`check_output` for a folder output."""
    return check_output(out_dir, option, force=force, names=names)


def claim_report_folder(folder: str | Path) -> Path:
    """Create ``recommend --out``'s folder (if needed) and write its manifest, listing the report files
    it holds now, so that a later run recognises the folder as advisor's. The caller has checked the
    path with ``check_output(folder, names=REPORT_NAMES)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files = {n: (folder / n).stat().st_size for n in REPORT_FILES if _kind_of(folder / n) == "file"}
    manifest = {"advisor_output": "recommend-report", "files": files,
                "folders": sorted(n for n in ("model", "compressed-tensors", "gguf") if read_manifest(folder / n))}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=2))
    return folder


# ------------------------------------------------------------------------------------ folder writing
def _remove_advisor_leftovers(target: Path) -> None:
    clean_stale_temporaries(target)
    old = target.parent / f".{target.name}.old"
    if _kind_of(old) == "dir" and read_manifest(old) is not None:
        shutil.rmtree(old, ignore_errors=True)


def _file_table(folder: Path) -> dict[str, int]:
    return {p.relative_to(folder).as_posix(): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}


def write_output_folder(out: str | Path, fill: Callable[[Path], None], manifest: dict[str, Any], *,
                        option: str = "--out", force: bool = False) -> Path:
    """Write an advisor output folder: ``fill(tmp)`` writes the files into a fresh temporary folder, then
    the manifest (``manifest`` plus the file table) is added and the folder put in place.

    An existing advisor folder (by its manifest, holding nothing else) is swapped whole; a folder with
    other files in it (allowed by ``force``, or an empty folder) gets advisor's files one by one, the
    others untouched, and files an earlier advisor write listed but this one does not are removed.
    Raises:
        AdvisorError: the path is refused (:func:`check_output`), or writing failed (disk full, ...);
            nothing of this write is left behind.
    """
    target = check_output(out, option, force=force)
    parent = target.parent
    _remove_advisor_leftovers(target)
    tmp = temporary_name(target)
    try:
        tmp.mkdir()
        fill(tmp)
        files = _file_table(tmp)
        full = dict(manifest, advisor_output=manifest.get("advisor_output", "folder"), files=files,
                    versions=package_versions())
        (tmp / MANIFEST).write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")
        kind = _kind_of(target)
        if kind == "missing":
            os.replace(tmp, target)
            return target
        old_manifest = read_manifest(target)
        present = {p.relative_to(target).as_posix() for p in target.rglob("*") if not p.is_dir()}
        ours = set(old_manifest["files"]) | {MANIFEST} if old_manifest else set()
        if old_manifest is not None and present <= ours:
            backup = parent / f".{target.name}.old"
            os.replace(target, backup)
            os.replace(tmp, target)
            shutil.rmtree(backup, ignore_errors=True)
            return target
        # a folder with files advisor did not write: replace only advisor's files, one by one
        for name in files:
            dst = target / name
            if _kind_of(dst) not in ("missing", "file"):
                raise AdvisorError(f"{option} {out}: {name} is in the way (a folder, link or special file); "
                                   "remove it or choose another path")
            if _kind_of(dst) == "file" and name not in ours:
                raise AdvisorError(f"{option} {out} already holds {name}, which advisor did not write; it is left "
                                   "untouched and nothing was written. Move it, or choose another path")
        for name in sorted(ours - set(files) - {MANIFEST}):
            if _kind_of(target / name) == "file":
                (target / name).unlink()
        for name in files:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp / name, target / name)
        os.replace(tmp / MANIFEST, target / MANIFEST)  # last: the folder is complete once it is there
        shutil.rmtree(tmp, ignore_errors=True)
        return target
    except AdvisorError:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except Exception as e:  # OSError, and safetensors reports I/O errors (disk full) as SafetensorError
        shutil.rmtree(tmp, ignore_errors=True)
        reason = getattr(e, "strerror", None) or str(e) or type(e).__name__
        raise AdvisorError(f"could not write {option} {out}: {reason} (disk full or not writable?); "
                           "nothing of this write was left behind") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------- native format
def split_model_state(model: torch.nn.Module) -> tuple[dict, dict[str, torch.Tensor], dict[str, str]]:
    """(packed modules by name, other tensors in their storage dtype, tied aliases ``alias -> kept``).

    Tensors that share storage (tied embeddings and head) are stored once, under their first name.
    """
    from advisor.kernels import QuantLinear

    modules = {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)}
    prefixes = tuple(f"{name}." for name in modules)
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, t in model.state_dict(keep_vars=False).items():
        if key.startswith(prefixes):
            continue
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
        if t.numel() and ident in seen:
            aliases[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().cpu().to(storage_dtype(t)).contiguous()
    return modules, tensors, aliases


def save_quantized_model(loaded, result, record: dict[str, Any], out_dir: str | Path, *,
                         force: bool = False, option: str = "--out") -> Path:
    """Write the packed model of ``loaded`` as a native advisor folder (see the module docstring).

    ``record`` (spec, measured ppl, protocol, its fingerprint...) goes into ``quantization.json`` and
    the manifest. Raises AdvisorError (nothing left behind) when the path is refused or writing fails.
    """
    from advisor.kernels.io import save_quantized

    modules, tensors, aliases = split_model_state(loaded.model)
    if not modules:
        raise AdvisorError("the model has no packed layers to save (was it quantized with --no-pack?); "
                           "the native format holds packed models")
    summary = {k: record[k] for k in ("spec", "ppl", "baseline_ppl", "protocol_fingerprint") if k in record}
    meta = dict(summary, aliases=aliases, bits_per_weight=result.bits_per_weight)

    def fill(tmp: Path) -> None:
        save_quantized(str(tmp / NATIVE_WEIGHTS), modules, meta, tensors)
        loaded.model.config.save_pretrained(tmp)
        if loaded.tokenizer is not None:
            loaded.tokenizer.save_pretrained(tmp)
        full = dict(record, quantization=result.to_dict(), versions=package_versions())
        (tmp / "quantization.json").write_text(json.dumps(full, indent=2, default=str), encoding="utf-8")

    manifest = dict(summary, advisor_output="native", format="advisor-native/1", weights=NATIVE_WEIGHTS,
                    source=loaded.source.to_dict())
    return write_output_folder(out_dir, fill, manifest, option=option, force=force)
