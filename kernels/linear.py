"""QuantLinear: packed low-bit weights with a fast CPU dequant-matmul forward.

Storage (all registered buffers, so ``state_dict()`` goes straight to safetensors):

- codes: ``qweight`` uint8 (or ``q4`` + ``q2`` for 6-bit), see :mod:`kernels.int_pack`;
- ``table`` float32 (2**bits,) or (out, 2**bits);
- ``scales`` float16 (out, n_groups) -- or ``scale_exp`` int8 (scale = 2**e, MX) -- or float32
  when ``meta["scale_dtype"] == "float32"`` and fp16 is not exact; offsets (optional) as ``zeros``
  uint8 when they are exactly ``-zero * scale`` with an integer zero (asymmetric ints), else
  ``offsets`` in the scale's float dtype; ``table`` is stored fp16 when that is exact;
- ``outlier_index`` int32 flat ``row * in_features + col`` (sorted), ``outlier_value`` float16;
- optional ``input_scale`` float32 (in,) (AWQ: ``y = W_hat (x / s)``) and ``bias`` float32 (out,).

The input dimension is padded (zero codes) to ``n_pad`` so that groups and kernel tiles are
whole bytes; the true shape is kept in ``in_features``.
"""
from __future__ import annotations

import contextlib
import functools
import math
import os
import warnings
from typing import Any

import numpy as np
import torch
from torch import nn

from .codebook import Decode, classify_table, exmy_grid
from .int_pack import UNIT, layout_for_bits, pack_codes, unpack_codes

# Batch sizes up to this run the packed kernels on CPU; larger ones dequantize once and run one
# GEMM (benchmarks/kernels.py measures both at the boundary).
MAX_FAST_BATCH = 8
# CPU features with native bfloat16 dot products (LLVM names): x86 AVX512-BF16 / AMX-BF16, Arm BF16.
BF16_FEATURES = ("avx512bf16", "amx-bf16", "bf16")
INT4_ENV = "ADVISOR_KERNEL_INT4"  # "torch": int4 layers on torch's CPU int4 kernel (opt-in)
MAX_TILE = 256


def _largest_tile(n: int, limit: int = MAX_TILE) -> int:
    """Largest multiple of 8 that divides n and is <= limit (0 if none)."""
    return max((t for t in range(8, min(n, limit) + 1, 8) if n % t == 0), default=0)


def _plan_padding(in_features: int, group_size: int) -> tuple[int, int, int, int]:
    """(group size, n_groups, n_pad, tile): codes are stored for n_pad >= in columns.

    Kernel tiles of ``tile`` columns never straddle a group (tile | group size), and the tile is
    chosen to divide the (8-rounded) width when it can, so a 576-wide layer with groups of 128
    is stored with tiles of 64 and no padding (a partial last group costs nothing extra).
    Returns tile 0 when no fast kernel applies (group size not a multiple of 8).
    """
    g = min(group_size, in_features)
    n_groups = math.ceil(in_features / g)
    width8 = 8 * math.ceil(in_features / 8)
    if n_groups == 1:
        tile = _largest_tile(width8)
        if tile < 64:
            tile = min(128, width8)
    elif g % 8:
        return g, n_groups, width8, 0
    else:
        tile = _largest_tile(math.gcd(g, width8))
        if tile < 32:
            tile = _largest_tile(g)
    return g, n_groups, tile * math.ceil(in_features / tile), tile


@contextlib.contextmanager
def _quiet_numba():
    """Numba's pedantic IR checks warn on our inlined select expressions at compile time; and
    launching numba's OpenMP threading layer resets the OpenMP thread count torch shares, so the
    caller's ``torch.set_num_threads`` is restored afterwards."""
    n_torch_threads = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is not in scope", module="numba")
        warnings.filterwarnings("ignore", category=UserWarning, module="numba")
        from numba.core.errors import NumbaIRAssumptionWarning

        warnings.simplefilter("ignore", NumbaIRAssumptionWarning)
        try:
            yield
        finally:
            if torch.get_num_threads() != n_torch_threads:
                torch.set_num_threads(n_torch_threads)


@contextlib.contextmanager
def _keep_torch_threads():
    """Restore the caller's torch thread count after a numba launch (see :func:`_quiet_numba`)."""
    n_torch_threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != n_torch_threads:
            torch.set_num_threads(n_torch_threads)


@functools.lru_cache(maxsize=1)
def native_bf16_gemm() -> bool:
    """Whether this CPU multiplies bfloat16 natively (:data:`BF16_FEATURES`). Without it torch's
    bf16 GEMM converts and runs slower than fp32: on an AMD EPYC Zen 1 (AVX2, one thread)
    4096x4096 by 16 / 64 / 256 tokens took 98 / 382 / 1567 ms in bf16 against 47 / 105 / 292 ms
    in fp32, so the CPU prefill path multiplies in fp32 there."""
    from . import simd

    features = simd.host_features()
    return any(features.get(name, False) for name in BF16_FEATURES)


def _vector_decode(rule: Decode, table: np.ndarray, per_row: bool, bits: int, isa: str):
    """The explicit-SIMD kernel's decode descriptor (see ``kernels.cpu._vdec``) for ISA path
    ``isa``: its values equal the scalar decode's, so ``mult``/``add`` folding is shared.

    A register lookup is one instruction on ``avx512``, so it decodes every table of up to 32
    entries there; on ``avx2`` (two or four 8-lane permutes and blends) and ``portable`` (select
    tree) integer codes convert directly and ExMy grids are built from their bits instead,
    except 16-value tables on ``avx2``: a byte table (one ``pshufb``, :func:`_byte_table`) where
    the values are small dyadic numbers (FP4 E2M1, MXFP4), else the two-permute lookup."""
    if rule.kind == "affine":  # float(code)
        return np.arange(16, dtype=np.float32)[None] if bits <= 4 and isa == "avx512" else None
    if rule.kind == "exmy":
        n_exp, n_man, _ = rule.exmy
        grid = exmy_grid(n_exp, n_man).astype(np.float32)
        if bits == 4 and 1 + n_exp + n_man == 4 and isa != "portable":  # 16 codes, one register
            return _table16(grid[None].copy(), isa)
        if bits == 6 and n_exp + n_man == 5 and isa == "avx512":  # 32 magnitudes + sign bit 5
            return grid[:32].reshape(1, 2, 16).copy()
        return tuple(int(v) for v in rule.exmy)
    t2 = np.ascontiguousarray(table.reshape(-1, table.shape[-1]), dtype=np.float32)
    if rule.kind == "lut16":
        rows = np.zeros((t2.shape[0] if per_row else 1, 16), np.float32)
        rows[:, :t2.shape[1]] = t2[:rows.shape[0]]
        return _table16(rows, isa)
    return (t2,)


def _table16(rows: np.ndarray, isa: str):
    """A 16-value register table (r, 16) as the ISA path looks it up: on ``avx2`` a byte table where the
    values allow one (:func:`_byte_table`), else the float rows (``vpermps``)."""
    lut = _byte_table(rows) if isa == "avx2" else None
    return rows if lut is None else lut


def _byte_table(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``rows`` (r, 16) as 16 signed bytes per row and one power-of-two multiplier (``kernels.cpu``'s
    byte-table descriptor) when every value is exactly ``byte * 2**-k`` for some ``k`` in 0..7, else
    None. On AVX2 one ``pshufb`` then looks up 16 codes, where a float table takes four 8-lane
    permutes and two blends."""
    for k in range(8):
        scaled = rows.astype(np.float64) * 2.0 ** k
        if np.all(scaled == np.round(scaled)) and np.all(np.abs(scaled) <= 127):
            table = np.ascontiguousarray(scaled.astype(np.int8).view(np.uint8))
            return table, np.array([2.0 ** -k], np.float32)
    return None


def _wide_decode(rule: Decode, table: np.ndarray, per_row: bool, bits: int):
    """The wide FP6 kernel's decode descriptor (``kernels.cpu._wide_step6``): the 64 decoded
    6-bit values as bfloat16 bit patterns, uint8 (rows, 128), when every value is exact in
    bfloat16 (FP6 grids, int6, ...), else None (no wide kernel)."""
    if bits != 6:
        return None
    if rule.kind == "affine":
        vals = np.arange(64, dtype=np.float32)[None]
    elif rule.kind == "exmy":
        vals = exmy_grid(*rule.exmy).astype(np.float32)[None]
    else:
        t2 = table.reshape(-1, table.shape[-1]).astype(np.float32)
        vals = t2 if per_row else t2[:1]
    if vals.shape[1] != 64:
        return None
    u = np.ascontiguousarray(vals, dtype=np.float32).view(np.uint32)
    if np.any(u & 0xFFFF):
        return None
    return np.ascontiguousarray((u >> 16).astype("<u2")).view(np.uint8)


def _to_f16_bits(t: torch.Tensor) -> np.ndarray:
    return t.contiguous().numpy().view(np.uint16)


class QuantLinear(nn.Module):
    """A linear layer whose weight is ``table[codes] * scale + offset`` (+ sparse outliers).

    Build it with :func:`pack_linear`; construct directly only from a saved ``config``.
    """

    def __init__(self, config: dict[str, Any]):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.in_features = int(c["in_features"])
        self.out_features = int(c["out_features"])
        self.bits = int(c["bits"])
        self.group_size, self.n_groups, self.n_pad, self.tile = _plan_padding(
            self.in_features, int(c["group_size"]))
        self.tiles_per_group = (self.n_pad if self.n_groups == 1 else self.group_size) // max(
            self.tile, 1)
        self.layout = layout_for_bits(self.bits)
        self.meta = dict(c.get("meta") or {})
        o, n, k = self.out_features, self.n_pad, 2 ** self.bits
        if self.layout == "split6":
            self.register_buffer("q4", torch.zeros(o, n // 2, dtype=torch.uint8))
            self.register_buffer("q2", torch.zeros(o, n // 4, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(o, n * self.bits // 8, dtype=torch.uint8))
        table_rows = int(c.get("table_rows", 0))
        tdt = torch.float16 if c.get("table_dtype") == "float16" else torch.float32
        self.register_buffer("table", torch.zeros((table_rows, k) if table_rows else (k,),
                                                  dtype=tdt))
        fdt = torch.float32 if c.get("scale_dtype") == "float32" else torch.float16
        if c.get("scale_format") == "exp2_int8":
            self.register_buffer("scale_exp", torch.zeros(o, self.n_groups, dtype=torch.int8))
        else:
            self.register_buffer("scales", torch.zeros(o, self.n_groups, dtype=fdt))
        if c.get("offset_format") == "zero_point_u8":  # offsets = -zero * scale, zero integer
            self.register_buffer("zeros", torch.zeros(o, self.n_groups, dtype=torch.uint8))
        elif c.get("has_offsets"):
            self.register_buffer("offsets", torch.zeros(o, self.n_groups, dtype=fdt))
        n_out = int(c.get("n_outliers", 0))
        if n_out:
            self.register_buffer("outlier_index", torch.zeros(n_out, dtype=torch.int32))
            self.register_buffer("outlier_value", torch.zeros(n_out, dtype=fdt))
        if c.get("has_input_scale"):
            self.register_buffer("input_scale", torch.ones(self.in_features))
        if c.get("has_bias"):
            self.register_buffer("bias", torch.zeros(o))
        else:
            self.bias = None
        self._fast = None
        self._warm = False
        self._cuda_int4_state = None
        self._torch_int4_state = None

    # ------------------------------------------------------------------ stored pieces, decoded
    def packed_buffers(self) -> dict[str, torch.Tensor]:
        """The code buffers of this layer's layout."""
        if self.layout == "split6":
            return {"q4": self.q4, "q2": self.q2}
        return {"qweight": self.qweight}

    def codes(self) -> torch.Tensor:
        """Unpacked codes, uint8 (out, in)."""
        packed = {k: v.cpu() for k, v in self.packed_buffers().items()}
        return unpack_codes(packed, self.bits)[:, :self.in_features].to(self.qweight_device)

    @property
    def qweight_device(self) -> torch.device:
        return self.table.device

    def group_scales(self) -> torch.Tensor:
        """float32 (out, n_groups)."""
        if hasattr(self, "scale_exp"):
            return torch.exp2(self.scale_exp.float())
        return self.scales.float()

    def group_offsets(self) -> torch.Tensor | None:
        """float32 (out, n_groups) or None."""
        if hasattr(self, "zeros"):
            return -self.zeros.float() * self.group_scales()
        return self.offsets.float() if hasattr(self, "offsets") else None

    def outliers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """None or (indices int64 (nnz, 2) [row, col], values float32 (nnz,))."""
        if not hasattr(self, "outlier_index"):
            return None
        flat = self.outlier_index.long()
        idx = torch.stack([flat // self.in_features, flat % self.in_features], dim=1)
        return idx, self.outlier_value.float()

    def packed_bytes(self) -> int:
        """Bytes of every buffer (codes incl. padding, table, scales, offsets, outliers, bias)."""
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def extra_repr(self) -> str:
        fmt = self.meta.get("dtype", f"{self.bits}-bit")
        return (f"in_features={self.in_features}, out_features={self.out_features}, format={fmt}, "
                f"group_size={self.group_size}, bias={self.bias is not None}")

    # ---------------------------------------------------------------------------- dequantize
    def dequantize(self) -> torch.Tensor:
        """float32 (out, in) weight, on the module's device (fast CPU kernel when available)."""
        if self.table.device.type == "cpu" and self.tile:
            f = self._fast_args()
            from . import cpu

            W = np.empty((self.out_features, self.n_pad), np.float32)
            with _quiet_numba():
                cpu.qdequant(f["packed"], W, UNIT[self.layout])
            W = torch.from_numpy(W)[:, :self.in_features]
            out = self.outliers()
            if out is not None:
                W = W.index_put((out[0][:, 0], out[0][:, 1]), out[1], accumulate=True)
            return W.contiguous()
        return self._dequantize_torch()

    def _dequantize_torch(self) -> torch.Tensor:
        """Device-agnostic dequantization with plain torch ops."""
        codes = self.codes().long()
        table = self.table.float()
        values = table[codes] if table.ndim == 1 else torch.gather(table, 1, codes)
        col_group = torch.arange(self.in_features, device=codes.device) // self.group_size
        W = values * self.group_scales()[:, col_group]
        off = self.group_offsets()
        if off is not None:
            W = W + off[:, col_group]
        out = self.outliers()
        if out is not None:
            W = W.index_put((out[0][:, 0], out[0][:, 1]), out[1], accumulate=True)
        return W

    # ------------------------------------------------------------------------------- forward
    def reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Slow and obviously correct: dequantize to fp32 with reference formulas, then matmul."""
        from .reference import dequantize_reference, matmul_reference

        W = dequantize_reference(self.codes().cpu(), self.table.cpu(), self.group_scales().cpu(),
                                 None if self.group_offsets() is None else
                                 self.group_offsets().cpu(), self.group_size,
                                 None if self.outliers() is None else
                                 tuple(t.cpu() for t in self.outliers()))
        x2 = x.reshape(-1, self.in_features).cpu()
        y = matmul_reference(x2, W, None if self.bias is None else self.bias.cpu(),
                             getattr(self, "input_scale", None))
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype).to(x.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).float()
        if hasattr(self, "input_scale"):
            x2 = x2 / self.input_scale
        path = self.forward_path(x2.shape[0], x2.device)
        if path == "packed":
            y = self._gemv(x2)
        elif path == "cuda_int4":
            y = self._cuda_int4(x2)
        elif path == "torch_int4":
            y = self._torch_int4_cpu(x2)
        elif path == "dequant_bf16":
            y = (x2.to(torch.bfloat16) @ self._dequantize_bf16().T).float()
        else:
            y = x2 @ self.dequantize().T
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)

    def forward_path(self, n_tokens: int, device: torch.device | str = "cpu") -> str:
        """Which computation :meth:`forward` runs for ``n_tokens`` rows on ``device``:

        - ``packed``: the packed CPU kernels (decode, up to ``MAX_FAST_BATCH`` tokens);
        - ``dequant_bf16``: dequantize once per call into bfloat16, then a bf16 GEMM (more
          tokens on a CPU with native bf16 dot products, :func:`native_bf16_gemm`, where the
          GEMM amortizes the decode; and on accelerators for layouts torch's int4 kernel does
          not take);
        - ``cuda_int4``: torch's CUDA int4 weight-only kernel (affine 4-bit codes, groups of
          32..256; the repacked weight is kept beside the codes);
        - ``torch_int4``: torch's CPU int4 weight-only kernel, any batch, opted into with
          ``ADVISOR_KERNEL_INT4=torch`` for layers that fit its layout (bf16 activations; the
          repacked weight is kept beside the codes, the same bytes again);
        - ``dequant_fp32``: dequantize once per call into float32 (the fast kernel where the
          layer has one), then an fp32 GEMM: more tokens on a CPU without native bf16, and
          CPU layers without a fast kernel (group size not a multiple of 8) at any batch.
        """
        dev = torch.device(device)
        if dev.type == "cpu":
            if os.environ.get(INT4_ENV, "packed") == "torch" and self._torch_int4_cpu_ok():
                return "torch_int4"
            if not self.tile:
                return "dequant_fp32"
            if n_tokens <= MAX_FAST_BATCH:
                return "packed"
            return "dequant_bf16" if native_bf16_gemm() else "dequant_fp32"
        if dev.type == "cuda" and self._cuda_int4_ok():
            return "cuda_int4"
        return "dequant_bf16"

    def _dequantize_bf16(self) -> torch.Tensor:
        """bfloat16 (out, in) weight for this call (fast CPU kernel, else torch ops)."""
        W = self.dequantize() if self.table.device.type == "cpu" and self.tile else \
            self._dequantize_torch()
        return W.to(torch.bfloat16)

    def int4_tinygemm_params(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """This layer in torch's int4 weight-only ("tinygemm") convention, or None if it does not
        fit it: (codes int32 (out, in) in [0, 16), scales_and_zeros float32 (n_groups, out, 2))
        with ``W = (code - 8) * scale + zero``. Fits: 4-bit affine codes (one shared table), no
        outliers, a group size of 32, 64, 128 or 256 dividing ``in_features``."""
        if self.bits != 4 or self.table.ndim != 1 or hasattr(self, "outlier_index") or \
                self.group_size not in (32, 64, 128, 256) or self.in_features % self.group_size:
            return None
        t = self.table.float().cpu()
        step = t[1] - t[0]
        if not torch.equal(t, t[0] + step * torch.arange(16.0)):
            return None
        s = self.group_scales().cpu()
        off = self.group_offsets()
        off = torch.zeros_like(s) if off is None else off.cpu()
        scale = s * step  # value = (t0 + step k) s + off = (k - 8) scale + zero
        zero = t[0] * s + off + 8 * scale
        return (self.codes().cpu().to(torch.int32),
                torch.stack([scale.T, zero.T], dim=2).contiguous())

    def _torch_int4_cpu_ok(self) -> bool:
        """torch's CPU int4 layout: out % 16 == 0, in % 32 == 0, and int4_tinygemm_params."""
        return (hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
                and self.out_features % 16 == 0 and self.in_features % 32 == 0
                and self.int4_tinygemm_params() is not None)

    def _torch_int4_cpu(self, x2: torch.Tensor) -> torch.Tensor:
        if getattr(self, "_torch_int4_state", None) is None:
            codes, sz = self.int4_tinygemm_params()
            self._torch_int4_state = (
                torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2),
                sz.to(torch.bfloat16))
        w, sz = self._torch_int4_state
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x2.to(torch.bfloat16), w,
                                                          self.group_size, sz).float()

    def _cuda_int4_ok(self) -> bool:
        if getattr(self, "_cuda_int4_state", None) == "failed":
            return False
        return (hasattr(torch.ops.aten, "_weight_int4pack_mm")
                and self.in_features % 1024 == 0 and self.out_features % 8 == 0
                and self.int4_tinygemm_params() is not None)

    def _cuda_int4(self, x2: torch.Tensor) -> torch.Tensor:
        """torch's CUDA int4 kernel (bf16 activations); falls back to dequantize + bf16 GEMM
        for good if the kernel refuses this device or layout."""
        try:
            if getattr(self, "_cuda_int4_state", None) is None:
                codes, sz = self.int4_tinygemm_params()
                dev = x2.device
                packed = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8).to(dev)
                self._cuda_int4_state = (
                    torch.ops.aten._convert_weight_to_int4pack(packed, 8),
                    sz.to(device=dev, dtype=torch.bfloat16))
            w, sz = self._cuda_int4_state
            return torch.ops.aten._weight_int4pack_mm(x2.to(torch.bfloat16), w, self.group_size,
                                                      sz).float()
        except (RuntimeError, NotImplementedError):
            self._cuda_int4_state = "failed"
            return (x2.to(torch.bfloat16) @ self._dequantize_bf16().T).float()

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        from . import cpu

        f = self._fast_args()
        B = x2.shape[0]
        x_np = x2.detach().contiguous().numpy()
        y = np.empty((B, self.out_features), np.float32)
        # after the first call every specialization is compiled: skip the warning filters
        with (_quiet_numba() if not self._warm else _keep_torch_threads()):
            # phase order (element U*j + r of each tile goes to r*(T/U) + j) and group sums
            # (the wide batch-1 FP6 kernel reads 8 codes per 32-bit lane: its own phase unit)
            wide = B == 1 and f["wide"]
            xp, xsum = cpu.phase_order(x_np, self.n_pad, self.tile,
                                       cpu.WIDE_UNIT if wide else UNIT[self.layout],
                                       self.group_size, self.n_groups)
            cpu.qgemv(f["packed"], xp, xsum, y, f["wdec"] if wide else f["vdec"],
                      cpu.PATH_WIDE if wide else cpu.PATH_SIMD if f["simd"] else cpu.PATH_LOOPS)
            if f["outliers"] is not None:
                rows, cols, vals = f["outliers"]
                cpu.add_outliers(y, x_np, rows, cols, vals)
        self._warm = True
        return torch.from_numpy(y)

    def _fast_args(self) -> dict[str, Any]:
        """Numpy views and the decode rule for the numba kernels (cached until buffers change)."""
        if self._fast is not None:
            return self._fast
        from . import simd
        from .cpu import LAYOUT_ID, Packed

        table = self.table.float().numpy()
        dec_rule: Decode = classify_table(table, self.bits)
        per_row = table.ndim == 2 and table.shape[0] > 1
        t2 = table.reshape(-1, table.shape[-1]).astype(np.float32)
        if dec_rule.kind == "affine":
            dec = None
        elif dec_rule.kind == "exmy":
            dec = tuple(int(v) for v in dec_rule.exmy)
        elif dec_rule.kind == "lut16":
            dec = np.zeros((t2.shape[0], 16), np.float32)
            dec[:, :t2.shape[1]] = t2
        else:
            dec = (np.ascontiguousarray(t2),)
        packed = self.packed_buffers()
        qa = (packed["q4"] if self.layout == "split6" else packed["qweight"]).numpy()
        qb = packed["q2"].numpy() if self.layout == "split6" else np.zeros((1, 1), np.uint8)
        if hasattr(self, "scale_exp"):
            scales = self.scale_exp.numpy()
        elif self.scales.dtype == torch.float16:
            scales = _to_f16_bits(self.scales)
        else:
            scales = self.scales.numpy()
        offsets = None
        if hasattr(self, "zeros"):
            offsets = self.zeros.numpy()
        elif hasattr(self, "offsets"):
            offsets = (_to_f16_bits(self.offsets) if self.offsets.dtype == torch.float16
                       else self.offsets.numpy())
        outl = None
        if hasattr(self, "outlier_index"):
            flat = self.outlier_index.numpy().astype(np.int64)
            outl = (flat // self.in_features, flat % self.in_features,
                    self.outlier_value.float().numpy())
        U = UNIT[self.layout]
        self._fast = {
            "packed": Packed(layout=LAYOUT_ID[self.layout], bits=self.bits, qa=qa, qb=qb, dec=dec,
                             per_row=per_row, scales=scales, offsets=offsets,
                             mult=np.float32(dec_rule.mult), add=np.float32(dec_rule.add),
                             T=self.tile, tpg=self.tiles_per_group),
            "vdec": _vector_decode(dec_rule, t2, per_row, self.bits, simd.ISA),
            # explicit-SIMD batch-1 kernel: 16 codes per step of every phase of a tile
            # (bit planes: 3-bit codes only, which the kernel gathers with one multiply)
            "simd": bool((self.layout != "planes" or self.bits == 3) and self.tile
                         and (self.tile // U) % (32 if self.layout == "byte8" else 16) == 0),
            # wide explicit-SIMD batch-1 FP6 kernel (bf16 decode), tiles of 128k codes
            "wdec": _wide_decode(dec_rule, t2, per_row, self.bits),
            "outliers": outl,
            "decode": dec_rule,
        }
        self._fast["wide"] = bool(simd.ISA == "avx512" and self.layout == "split6" and self.tile
                                  and self.tile % (16 * 8) == 0
                                  and self._fast["wdec"] is not None)
        return self._fast

    def _apply(self, fn, *args, **kwargs):
        self._fast = None
        self._warm = False
        self._cuda_int4_state = None
        self._torch_int4_state = None
        return super()._apply(fn, *args, **kwargs)

    def _load_from_state_dict(self, *args, **kwargs):
        self._fast = None
        self._warm = False
        self._cuda_int4_state = None
        self._torch_int4_state = None
        return super()._load_from_state_dict(*args, **kwargs)


def _fp16_exact(t: torch.Tensor) -> bool:
    return bool(torch.equal(t.half().float(), t))


def _zero_points(offsets: torch.Tensor, scales: torch.Tensor) -> torch.Tensor | None:
    """uint8 zero points z with ``offsets == -z * scales`` exactly in fp32, else None."""
    safe = torch.where(scales == 0, torch.ones_like(scales), scales)
    z = torch.round(-offsets / safe)
    if z.min() < 0 or z.max() > 255 or not torch.equal(-z * scales, offsets):
        return None
    return z.to(torch.uint8)


def pack_linear(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None, *,
                bits: int, table: torch.Tensor, group_size: int, outliers=None, bias=None,
                meta: dict | None = None) -> QuantLinear:
    """Pack a quantized weight ``W = table[codes] * scales + offsets`` (+ outliers) into a module.

    Args:
        codes: integer (out, in), values in [0, 2**bits).
        scales: float32 (out, ceil(in / group_size)); offsets: same shape or None.
        bits: code width 1..8; table: float32 (2**bits,) or (out, 2**bits).
        group_size: columns per scale group (``>= in`` means per output channel).
        outliers: None or (indices (nnz, 2) [row, col], values float32 (nnz,)), added to W.
        bias: None or (out,).
        meta: free-form format description stored with the layer (e.g. ``{"dtype": "nf4"}``).
            Recognized keys: ``scale_pow2`` (True: scales are exact powers of two, stored as int8
            exponents, MX), ``scale_dtype`` ("float16" default, or "float32": lossless storage
            of scales, offsets and outlier values -- still fp16 where fp16 is exact),
            ``input_scale`` (tensor (in,), AWQ:
            the layer computes ``W (x / input_scale)``; not kept in meta).
    Returns:
        QuantLinear on CPU.
    """
    meta = dict(meta or {})
    input_scale = meta.pop("input_scale", None)
    codes = torch.as_tensor(codes).cpu()
    n_out, n_in = codes.shape
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 2 ** bits):
        raise ValueError(f"codes must lie in [0, {2 ** bits}) for bits={bits}")
    table = torch.as_tensor(table, dtype=torch.float32).cpu()
    if table.shape[-1] != 2 ** bits or table.ndim not in (1, 2) or (
            table.ndim == 2 and table.shape[0] != n_out):
        raise ValueError(f"table must be (2**bits,) or (out, 2**bits); got {tuple(table.shape)}")
    if not torch.isfinite(table).all():
        used = table[codes.long()] if table.ndim == 1 else torch.gather(table, 1, codes.long())
        if not torch.isfinite(used).all():
            raise ValueError("codes point at non-finite table entries")
        table = torch.nan_to_num(table, nan=0.0, posinf=0.0, neginf=0.0)
    scales = torch.as_tensor(scales, dtype=torch.float32).cpu().reshape(n_out, -1)
    pow2 = bool(meta.get("scale_pow2"))
    scale_dtype = meta.get("scale_dtype", "float16")
    if scale_dtype not in ("float16", "float32"):
        raise ValueError("meta['scale_dtype'] must be 'float16' or 'float32'")
    if offsets is not None:
        offsets = torch.as_tensor(offsets, dtype=torch.float32).cpu().reshape(n_out, -1)
    if scale_dtype == "float32" and _fp16_exact(scales) and (
            offsets is None or _zero_points(offsets, scales) is not None):
        scale_dtype = "float16"  # "float32" asks for lossless storage; fp16 is lossless here
    zeros = None if offsets is None or pow2 else _zero_points(
        offsets, scales.half().float() if scale_dtype == "float16" else scales)
    config = {
        "in_features": n_in, "out_features": n_out, "bits": bits, "group_size": int(group_size),
        "table_rows": n_out if table.ndim == 2 else 0,
        "table_dtype": "float16" if _fp16_exact(table) else "float32",
        "offset_format": "zero_point_u8" if zeros is not None else scale_dtype,
        "scale_format": "exp2_int8" if pow2 else scale_dtype, "scale_dtype": scale_dtype,
        "has_offsets": offsets is not None,
        "n_outliers": 0 if outliers is None else int(len(outliers[1])),
        "has_input_scale": input_scale is not None, "has_bias": bias is not None,
        "meta": meta,
    }
    mod = QuantLinear(config)
    if scales.shape[1] != mod.n_groups:
        raise ValueError(f"scales must be (out, {mod.n_groups}); got {tuple(scales.shape)}")
    padded = torch.zeros(n_out, mod.n_pad, dtype=torch.uint8)
    padded[:, :n_in] = codes.to(torch.uint8)
    for name, buf in pack_codes(padded, bits).items():
        getattr(mod, name).copy_(buf)
    mod.table.copy_(table)
    if pow2:
        exp = torch.round(torch.log2(scales))
        if not torch.equal(torch.exp2(exp), scales) or exp.abs().max() > 127:
            raise ValueError("meta['scale_pow2'] set but scales are not powers of two in 2**±127")
        mod.scale_exp.copy_(exp.to(torch.int8))
    else:
        mod.scales.copy_(scales)
    if zeros is not None:
        mod.zeros.copy_(zeros)
    elif offsets is not None:
        mod.offsets.copy_(offsets)
    if outliers is not None and len(outliers[1]):
        idx = torch.as_tensor(outliers[0]).long().cpu()
        flat = idx[:, 0] * n_in + idx[:, 1]
        if n_out * n_in >= 2 ** 31:
            raise ValueError("outlier flat index does not fit int32 for this shape")
        order = torch.argsort(flat)
        mod.outlier_index.copy_(flat[order].to(torch.int32))
        mod.outlier_value.copy_(torch.as_tensor(outliers[1], dtype=torch.float32).cpu()[order])
    if input_scale is not None:
        mod.input_scale.copy_(torch.as_tensor(input_scale, dtype=torch.float32).reshape(-1))
    if bias is not None:
        mod.bias.copy_(torch.as_tensor(bias, dtype=torch.float32).reshape(-1))
    return mod
