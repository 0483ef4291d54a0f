"""Fast CPU dequant-matmul kernels (numba, LLVM auto-vectorized; see docs/kernels.md).

One generic row kernel serves every format. What varies is chosen by argument *type* at compile
time (numba specializes per type signature and ``cache=True`` keeps each specialization on disk):

- ``dec`` (value of a code): ``None`` -> affine ``float(code)``; ``(E, M, bias)`` int tuple ->
  ExMy float built from bits; float32 (rows, 16) array -> select tree over 16 register values;
  ``(table2d,)`` 1-tuple -> memory gather.
- ``scales``: uint16 (fp16 bit patterns), float32, or int8 (power-of-two exponents, MX).
- ``offsets``: ``None`` or uint16 / float32.

and by the code ``layout`` (crumb2, nib4, byte8, planes, split6; see :mod:`kernels.int_pack`),
a literal in each layout's entry points, which are made from one template (``_PER_LAYOUT``). A
layer's arrays and constants travel as one :class:`Packed` value, a product's activations and
output as one :class:`Operands` value. Inputs arrive permuted into *phase order* per tile of
``T`` codes: the code at ``U*j + r`` of a tile (``U`` codes per storage unit) sits at
``r*(T/U) + j``, so the lowest nibbles of a tile's bytes meet contiguous activations and every
inner loop is a unit-stride vector loop. Per group ``g``:
``y[b, o] += (scale*mult) * sum_i value_i x_i + (scale*add + offset) * sum_i x_i``.
Batch 1 decodes and multiplies in one pass -- with the explicit-SIMD kernel
(:func:`_gemv_rows_simd_b1`, 16-lane vectors from :mod:`kernels.simd`) when every phase of a
tile is a multiple of 16 codes, else the auto-vectorized scalar loops; larger batches decode a
tile once into an L1 buffer (vector decode where the batch-1 SIMD kernel applies) and reuse it for
up to four batch rows per pass. Row tasks of a product are claimed from an atomic counter by the
threads of torch's OpenMP team (:mod:`kernels.team`; fallback: the caller and
``numba.get_num_threads() - 1`` helper threads, :func:`qgemv`), and so are those of the prefill
dequantize kernel (:func:`qdequant`).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple

import numpy as np
from llvmlite import ir
from numba import get_num_threads, njit, types
from numba.extending import intrinsic, overload

from . import team
from .simd import (vadd, vexmy, vlut8, vfield, vflip_sign, vfma, vgather, vhsum, vload_f32, vload_u8,
                   vload_u16, vload_u32, vload_u8w, vmul_k, vor_shl, vstore_f32, prefetch, vbf16_even, vbf16_odd,
                   vcode6w, vperm16, vperm32, vperm64w, vsplat, vtof, vzero)

LAYOUT_ID = {"crumb2": 0, "nib4": 1, "byte8": 2, "planes": 3, "split6": 4}
ROWS_PER_TASK = 16


@intrinsic
def _atomic_add(typingctx, arr, i, v):
    """``arr[i] += v`` atomically (sequentially consistent); returns the old value."""
    sig = types.int64(arr, i, v)

    def codegen(context, builder, signature, args):
        a = context.make_array(signature.args[0])(context, builder, args[0])
        ptr = builder.gep(a.data, [args[1]])
        val = args[2]
        if val.type != ir.IntType(64):
            val = builder.sext(val, ir.IntType(64))
        return builder.atomic_rmw("add", ptr, val, "seq_cst")

    return sig, codegen


@intrinsic
def _i2f(typingctx, v):
    """Reinterpret int32 bits as float32 (free; vectorizes)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _u8_to_f32(typingctx, v):
    """float32 of the low 8 bits of an integer: lets LLVM keep code math in 8/32-bit lanes
    (numba widens uint8 arithmetic to int64, which halves the vector width)."""
    sig = types.float32(v)

    def codegen(context, builder, signature, args):
        t = builder.trunc(args[0], context.get_value_type(types.uint8))
        return builder.uitofp(t, context.get_value_type(types.float32))

    return sig, codegen


@intrinsic
def _bit(typingctx, c, k):
    """``(c >> k) & 1 != 0`` computed in 32-bit lanes (for the 16-value select tree)."""
    sig = types.boolean(c, k)

    def codegen(context, builder, signature, args):
        i32 = context.get_value_type(types.int32)
        v, kk = (builder.trunc(a, i32) if a.type.width > 32 else
                 (builder.zext(a, i32) if a.type.width < 32 else a) for a in args)
        masked = builder.and_(v, builder.shl(context.get_constant(types.int32, 1), kk))
        return builder.icmp_unsigned("!=", masked, context.get_constant(types.int32, 0))

    return sig, codegen


@intrinsic
def _field(typingctx, v, shift, mask):
    """``(v >> shift) & mask`` in 32-bit lanes, typed int32 (numba widens byte math to int64)."""
    sig = types.int32(v, shift, mask)

    def codegen(context, builder, signature, args):
        i32 = context.get_value_type(types.int32)
        a, sh, mk = (builder.trunc(x, i32) if x.type.width > 32 else
                     (builder.zext(x, i32) if x.type.width < 32 else x) for x in args)
        return builder.and_(builder.lshr(a, sh), mk)

    return sig, codegen


@intrinsic
def _stitch6(typingctx, q4, q2, r):
    """6-bit code of phase ``r`` (0..3) from its 4-bit segment byte and 2-bit segment byte,
    ``((q4 >> 4 (r & 1)) & 15) | (((q2 >> 2 r) & 3) << 4)``, in 32-bit lanes (numba would widen
    the byte math to int64 and halve the vector width)."""
    sig = types.int32(q4, q2, r)

    def codegen(context, builder, signature, args):
        i32 = context.get_value_type(types.int32)

        def as_i32(v):
            w = v.type.width
            if w == 32:
                return v
            return builder.trunc(v, i32) if w > 32 else builder.zext(v, i32)

        a, b, rr = (as_i32(v) for v in args)
        c = lambda k: context.get_constant(types.int32, k)  # noqa: E731
        lo = builder.and_(builder.lshr(a, builder.shl(builder.and_(rr, c(1)), c(2))), c(15))
        hi = builder.and_(builder.lshr(b, builder.shl(rr, c(1))), c(3))
        return builder.or_(lo, builder.shl(hi, c(4)))

    return sig, codegen


@intrinsic
def _exmy_to_f32(typingctx, c, n_exp, n_man, bias):
    """Value of a sign-magnitude ExMy code (subnormals, no Inf/NaN) built from its bits in
    32-bit lanes: exponent/mantissa moved into float32 position, bias re-based; exponent field 0
    (subnormal) fixed up as ``2 f - 2**(1-bias)``. This is the FP6-LLM bit-copy trick on CPU."""
    sig = types.float32(c, n_exp, n_man, bias)

    def codegen(context, builder, signature, args):
        i32 = context.get_value_type(types.int32)
        f32 = context.get_value_type(types.float32)

        def const(k):
            return context.get_constant(types.int32, k)

        def as_i32(v):
            w = v.type.width
            if w == 32:
                return v
            return builder.trunc(v, i32) if w > 32 else builder.zext(v, i32)

        cc, ne, nm, bi = (as_i32(a) for a in args)
        one = const(1)
        c23 = const(23)
        em = builder.add(ne, nm)
        mag = builder.and_(cc, builder.sub(builder.shl(one, em), one))
        bits = builder.add(builder.shl(mag, builder.sub(c23, nm)),
                           builder.shl(builder.sub(const(127), bi), c23))
        f = builder.bitcast(bits, f32)
        two_pow = builder.bitcast(builder.shl(builder.sub(const(128), bi), c23),
                                  f32)
        sub = builder.fsub(builder.fadd(f, f), two_pow)
        is_sub = builder.icmp_unsigned("<", mag, builder.shl(one, nm))
        v = builder.bitcast(builder.select(is_sub, sub, f), i32)
        # sign: move the code's sign bit to bit 31 and OR it in (cheaper than a compare+select)
        sign = builder.and_(builder.shl(cc, builder.sub(const(31), em)), const(-2 ** 31))
        return builder.bitcast(builder.or_(v, sign), f32)

    return sig, codegen


@njit(inline="always")
def _f16_bits_to_f32(h):
    """fp16 bit pattern -> float32, branch-free so a row of scales converts as one vector loop
    (Inf/NaN patterns are not expected in scales and are not special-cased)."""
    h = np.int32(h)
    normal = _i2f(np.int32(((h & 0x7FFF) << 13) + (112 << 23)))
    sub = np.float32(h & 1023) * np.float32(5.960464477539063e-08)  # 2**-24
    v = sub if (h & 0x7C00) == 0 else normal
    return -v if (h & 0x8000) != 0 else v


# ----------------------------------------------------------------- compile-time dispatch stubs
def _load_row(arr, o, out):
    """out[:] = float32 values of row o of a scale/offset array (fp16 bits, f32, int8 exp)."""
    raise NotImplementedError


def _load_offsets(arr, o, srow, out):
    """out[:] = offsets of row o: float arrays as values, uint8 as zero points (-z * scale)."""
    raise NotImplementedError


def _row_table(dec, row):
    raise NotImplementedError


def _val(c, dec, tt):
    raise NotImplementedError


@overload(_load_row)
def _ov_load_row(arr, o, out):
    if isinstance(arr, (types.NoneType, types.Omitted)):
        def impl_none(arr, o, out):
            for g in range(out.shape[0]):
                out[g] = 0.0
        return impl_none
    if arr.dtype == types.uint16:
        def impl_f16(arr, o, out):
            row = arr[o]
            for g in range(out.shape[0]):
                out[g] = _f16_bits_to_f32(row[g])
        return impl_f16
    if arr.dtype == types.int8:
        def impl_exp(arr, o, out):  # 2**e for e in [-126, 127]
            row = arr[o]
            for g in range(out.shape[0]):
                out[g] = _i2f(np.int32((np.int32(row[g]) + 127) << 23))
        return impl_exp

    def impl_f32(arr, o, out):
        row = arr[o]
        for g in range(out.shape[0]):
            out[g] = row[g]
    return impl_f32


@overload(_load_offsets)
def _ov_load_offsets(arr, o, srow, out):
    if isinstance(arr, types.Array) and arr.dtype == types.uint8:
        def impl_zero_point(arr, o, srow, out):
            row = arr[o]
            for g in range(out.shape[0]):
                out[g] = -np.float32(row[g]) * srow[g]
        return impl_zero_point
    return lambda arr, o, srow, out: _load_row(arr, o, out)


@overload(_row_table)
def _ov_row_table(dec, row):
    if isinstance(dec, types.Array):  # lut16: keep the row's 16 values in registers
        def impl(dec, row):
            t = dec[row]
            return (t[0], t[1], t[2], t[3], t[4], t[5], t[6], t[7],
                    t[8], t[9], t[10], t[11], t[12], t[13], t[14], t[15])
        return impl
    if isinstance(dec, types.BaseTuple) and isinstance(dec[0], types.Array):  # gather: a row
        return lambda dec, row: dec[0][row]
    if isinstance(dec, types.UniTuple) and isinstance(dec.dtype, types.Integer):  # exmy
        def impl_exmy(dec, row):
            return _i2f(np.int32((128 - dec[2]) << 23))  # 2**(1-bias), subnormal correction
        return impl_exmy
    return lambda dec, row: np.float32(0.0)


@overload(_val, inline="always")
def _ov_val(c, dec, tt):
    if isinstance(dec, types.NoneType):
        return lambda c, dec, tt: _u8_to_f32(c)
    if isinstance(dec, types.Array):
        def impl_sel(c, dec, tt):
            b0 = _bit(c, 0)
            b1 = _bit(c, 1)
            b2 = _bit(c, 2)
            b3 = _bit(c, 3)
            l0 = tt[1] if b0 else tt[0]
            l1 = tt[3] if b0 else tt[2]
            l2 = tt[5] if b0 else tt[4]
            l3 = tt[7] if b0 else tt[6]
            l4 = tt[9] if b0 else tt[8]
            l5 = tt[11] if b0 else tt[10]
            l6 = tt[13] if b0 else tt[12]
            l7 = tt[15] if b0 else tt[14]
            m0 = l1 if b1 else l0
            m1 = l3 if b1 else l2
            m2 = l5 if b1 else l4
            m3 = l7 if b1 else l6
            n0 = m1 if b2 else m0
            n1 = m3 if b2 else m2
            return n1 if b3 else n0
        return impl_sel
    if isinstance(dec, types.BaseTuple) and isinstance(dec[0], types.Array):
        return lambda c, dec, tt: tt[c]
    if isinstance(dec, types.UniTuple) and isinstance(dec.dtype, types.Integer):
        def impl_exmy(c, dec, tt):
            return _exmy_to_f32(c, dec[0], dec[1], dec[2])
        return impl_exmy
    raise TypeError("unsupported decode descriptor")


# ------------------------------------------------------------------------------- tile decoders
@njit(inline="always")
def _decode_tile(layout, bits, qa, qb, o, tb, T, nb_plane, dec, tt, wbuf, cbuf):
    """Decode tile ``tb`` of row ``o`` into ``wbuf[:T]`` (phase order, unscaled values)."""
    if layout == 0:  # crumb2
        Q = T // 4
        seg = qa[o, tb * Q:tb * Q + Q]
        for r in range(4):
            w = wbuf[r * Q:r * Q + Q]
            sh = 2 * r
            for j in range(Q):
                w[j] = _val((seg[j] >> sh) & 3, dec, tt)
    elif layout == 1:  # nib4
        Q = T // 2
        seg = qa[o, tb * Q:tb * Q + Q]
        w0 = wbuf[:Q]
        w1 = wbuf[Q:2 * Q]
        for j in range(Q):
            w0[j] = _val(seg[j] & 15, dec, tt)
        for j in range(Q):
            w1[j] = _val(seg[j] >> 4, dec, tt)
    elif layout == 2:  # byte8
        seg = qa[o, tb * T:tb * T + T]
        for j in range(T):
            wbuf[j] = _val(seg[j], dec, tt)
    elif layout == 4:  # split6: q4 (2 per byte) + q2 (4 per byte)
        Q = T // 4
        s2 = qb[o, tb * Q:tb * Q + Q]
        s4 = qa[o, tb * 2 * Q:tb * 2 * Q + 2 * Q]
        w = wbuf[:Q]
        for j in range(Q):
            w[j] = _val((s4[2 * j] & 15) | ((s2[j] & 3) << 4), dec, tt)
        w = wbuf[Q:2 * Q]
        for j in range(Q):
            w[j] = _val((s4[2 * j] >> 4) | ((s2[j] & 12) << 2), dec, tt)
        w = wbuf[2 * Q:3 * Q]
        for j in range(Q):
            w[j] = _val((s4[2 * j + 1] & 15) | (s2[j] & 48), dec, tt)
        w = wbuf[3 * Q:4 * Q]
        for j in range(Q):
            w[j] = _val((s4[2 * j + 1] >> 4) | ((s2[j] >> 2) & 48), dec, tt)
    elif bits == 3:  # planes, 3-bit: codes straight from the three plane bytes
        Q = T // 8
        nb = nb_plane
        p0 = qa[o, tb * Q:tb * Q + Q]
        p1 = qa[o, nb + tb * Q:nb + tb * Q + Q]
        p2 = qa[o, 2 * nb + tb * Q:2 * nb + tb * Q + Q]
        for r in range(8):
            w = wbuf[r * Q:r * Q + Q]
            for j in range(Q):
                w[j] = _val(((p0[j] >> r) & 1) | (((p1[j] >> r) & 1) << 1)
                            | (((p2[j] >> r) & 1) << 2), dec, tt)
    else:  # planes, any width
        Q = T // 8
        for r in range(8):
            for j in range(Q):
                cbuf[j] = 0
            for p in range(bits):
                pl = qa[o, p * nb_plane + tb * Q:p * nb_plane + tb * Q + Q]
                for j in range(Q):
                    cbuf[j] |= ((np.int32(pl[j]) >> r) & 1) << p
            w = wbuf[r * Q:r * Q + Q]
            for j in range(Q):
                w[j] = _val(cbuf[j], dec, tt)


@njit(inline="always")
def _dot_tile_b1(layout, qa, qb, o, tb, T, dec, tt, x):
    """Fused decode + dot for one batch row; ``x`` is the tile's phase-ordered activations."""
    a = np.float32(0.0)
    if layout == 0:
        Q = T // 4
        seg = qa[o, tb * Q:tb * Q + Q]
        x0 = x[:Q]
        x1 = x[Q:2 * Q]
        x2 = x[2 * Q:3 * Q]
        x3 = x[3 * Q:4 * Q]
        for j in range(Q):
            b = seg[j]
            a += (_val(b & 3, dec, tt) * x0[j] + _val((b >> 2) & 3, dec, tt) * x1[j]
                  + _val((b >> 4) & 3, dec, tt) * x2[j] + _val(b >> 6, dec, tt) * x3[j])
    elif layout == 1:
        Q = T // 2
        seg = qa[o, tb * Q:tb * Q + Q]
        x0 = x[:Q]
        x1 = x[Q:2 * Q]
        for j in range(Q):
            b = seg[j]
            a += (_val(_field(b, 0, 15), dec, tt) * x0[j]
                  + _val(_field(b, 4, 15), dec, tt) * x1[j])
    elif layout == 2:
        seg = qa[o, tb * T:tb * T + T]
        for j in range(T):
            a += _val(seg[j], dec, tt) * x[j]
    elif layout == 3:  # 3-bit planes (callers use this only when bits == 3)
        Q = T // 8
        nb = qa.shape[1] // 3
        p0 = qa[o, tb * Q:tb * Q + Q]
        p1 = qa[o, nb + tb * Q:nb + tb * Q + Q]
        p2 = qa[o, 2 * nb + tb * Q:2 * nb + tb * Q + Q]
        for j in range(Q):  # all 8 phases in one pass: 24 bits in, 8 codes out
            c = (np.int32(p0[j]) | (np.int32(p1[j]) << 8)) | (np.int32(p2[j]) << 16)
            a += (_val((c & 1) | ((c >> 7) & 2) | ((c >> 14) & 4), dec, tt) * x[j]
                  + _val(((c >> 1) & 1) | ((c >> 8) & 2) | ((c >> 15) & 4), dec, tt) * x[Q + j]
                  + _val(((c >> 2) & 1) | ((c >> 9) & 2) | ((c >> 16) & 4), dec, tt)
                  * x[2 * Q + j]
                  + _val(((c >> 3) & 1) | ((c >> 10) & 2) | ((c >> 17) & 4), dec, tt)
                  * x[3 * Q + j]
                  + _val(((c >> 4) & 1) | ((c >> 11) & 2) | ((c >> 18) & 4), dec, tt)
                  * x[4 * Q + j]
                  + _val(((c >> 5) & 1) | ((c >> 12) & 2) | ((c >> 19) & 4), dec, tt)
                  * x[5 * Q + j]
                  + _val(((c >> 6) & 1) | ((c >> 13) & 2) | ((c >> 20) & 4), dec, tt)
                  * x[6 * Q + j]
                  + _val(((c >> 7) & 1) | ((c >> 14) & 2) | ((c >> 21) & 4), dec, tt)
                  * x[7 * Q + j])
    else:  # split6
        Q = T // 4
        s2 = qb[o, tb * Q:tb * Q + Q]
        s4 = qa[o, tb * 2 * Q:tb * 2 * Q + 2 * Q]
        x0 = x[:Q]
        x1 = x[Q:2 * Q]
        x2 = x[2 * Q:3 * Q]
        x3 = x[3 * Q:4 * Q]
        for j in range(Q):
            b2 = s2[j]
            lo = s4[2 * j]
            hi = s4[2 * j + 1]
            a += (_val(_stitch6(lo, b2, 0), dec, tt) * x0[j]
                  + _val(_stitch6(lo, b2, 1), dec, tt) * x1[j]
                  + _val(_stitch6(hi, b2, 2), dec, tt) * x2[j]
                  + _val(_stitch6(hi, b2, 3), dec, tt) * x3[j])
    return a



# ------------------------------------------------------------------ explicit-SIMD batch-1 path
# ``vdec`` (by type) says how the vector kernel decodes a code; values equal ``_val``'s:
#   None -> float(code) (int8 and other affine grids wider than 4 bits);
#   float32 (rows, 16) array -> 16-entry register table per row (or one shared row), vpermps:
#     4-bit ints, 4-bit ExMy (FP4, MXFP4), NF4, any table of <= 16 values;
#   float32 (1, 2, 16) array -> 32 magnitudes + sign bit 5, vpermi2ps: FP6 E3M2 / E2M3;
#   (uint8 (rows, 16), float32 (1,)) -> 16 signed bytes, one pshufb (avx2), for 16-value tables of
#     small dyadic numbers (FP4 E2M1 and MXFP4 elements are halves): the bytes are the values times
#     2**k and the kernels fold the 2**-k (``_vdec_mult``) into the group scale, which is exact;
#   (E, M, bias) ints -> ExMy value built from bits (FP8);
#   (table (rows, 2**bits),) -> per-lane gather (other codebooks).
# (Tables travel as arrays, which numba caches as plain array arguments.)
def _vrow_table(vdec, row):
    raise NotImplementedError


def _vdec(c, vdec, vt):
    raise NotImplementedError


@overload(_vrow_table, inline="always")
def _ov_vrow_table(vdec, row):
    if isinstance(vdec, types.Array) and vdec.dtype == types.uint8:  # 64 bf16 words (wide FP6)
        return lambda vdec, row: (vload_u32(vdec[row], 0), vload_u32(vdec[row], 64))
    if isinstance(vdec, types.Array) and vdec.ndim == 2:
        def impl16(vdec, row):
            v = vload_f32(vdec[row], 0)
            return (v, v)
        return impl16
    if isinstance(vdec, types.Array) and vdec.ndim == 3:
        return lambda vdec, row: (vload_f32(vdec[0, 0], 0), vload_f32(vdec[0, 1], 0))
    if _is_byte_table(vdec):
        return lambda vdec, row: vload_u8(vdec[0][row], 0)
    if isinstance(vdec, types.BaseTuple) and isinstance(vdec[0], types.Array):
        return lambda vdec, row: vdec[0][row]
    return lambda vdec, row: 0


def _vdec_mult(vdec):
    raise NotImplementedError


@overload(_vdec_mult, inline="always")
def _ov_vdec_mult(vdec):
    """What ``_vdec``'s values are multiplied by to equal the scalar decode's (1 but for byte tables)."""
    if _is_byte_table(vdec):
        return lambda vdec: vdec[1][0]
    return lambda vdec: np.float32(1.0)


def _is_byte_table(vdec) -> bool:
    """The (16 signed bytes per row, power-of-two multiplier) descriptor, by numba type."""
    return (isinstance(vdec, types.BaseTuple) and len(vdec) == 2 and isinstance(vdec[0], types.Array)
            and vdec[0].dtype == types.uint8 and isinstance(vdec[1], types.Array))


@overload(_vdec, inline="always")
def _ov_vdec(c, vdec, vt):
    if isinstance(vdec, types.NoneType):
        return lambda c, vdec, vt: vtof(c)
    if isinstance(vdec, types.Array) and vdec.dtype == types.uint8:  # 64 bf16 words
        return lambda c, vdec, vt: vbf16_even(vperm64w(vt[0], vt[1], c))
    if isinstance(vdec, types.Array) and vdec.ndim == 2:
        return lambda c, vdec, vt: vperm16(vt[0], c)
    if isinstance(vdec, types.Array) and vdec.ndim == 3:
        return lambda c, vdec, vt: vflip_sign(vperm32(vt[0], vt[1], c), c, 5)
    if isinstance(vdec, types.UniTuple) and isinstance(vdec.dtype, types.Integer):
        return lambda c, vdec, vt: vexmy(c, vdec[0], vdec[1], vdec[2])
    if _is_byte_table(vdec):
        return lambda c, vdec, vt: vlut8(vt, c)
    if isinstance(vdec, types.BaseTuple) and isinstance(vdec[0], types.Array):
        return lambda c, vdec, vt: vgather(vt, c)
    raise TypeError("unsupported vector decode descriptor")


@njit(inline="always", fastmath=True)
def _vdot_tile(layout, qa, qb, o, tb, T, vdec, vt, x, x0, pa, pb):
    """(pa, pb) += decoded codes of tile ``tb`` of row ``o`` times x[x0:x0+T] (phase order),
    16 lanes at a time; the tile's per-phase length must be a multiple of 16."""
    if layout == 0:  # crumb2: 4 codes per byte
        Q = T // 4
        row = qa[o]
        base = tb * Q
        for j in range(0, Q, 16):
            b = vload_u8(row, base + j)
            pa = vfma(_vdec(vfield(b, 0, 3), vdec, vt), vload_f32(x, x0 + j), pa)
            pb = vfma(_vdec(vfield(b, 2, 3), vdec, vt), vload_f32(x, x0 + Q + j), pb)
            pa = vfma(_vdec(vfield(b, 4, 3), vdec, vt), vload_f32(x, x0 + 2 * Q + j), pa)
            pb = vfma(_vdec(vfield(b, 6, 3), vdec, vt), vload_f32(x, x0 + 3 * Q + j), pb)
    elif layout == 1:  # nib4: low nibbles meet x[x0:x0+Q], high nibbles x[x0+Q:x0+2Q]
        Q = T // 2
        row = qa[o]
        base = tb * Q
        for j in range(0, Q, 16):
            b = vload_u8(row, base + j)
            prefetch(row, base + j + NIB4_PREFETCH_BYTES)  # the hardware prefetcher lags behind
            pa = vfma(_vdec(vfield(b, 0, 15), vdec, vt), vload_f32(x, x0 + j), pa)
            pb = vfma(_vdec(vfield(b, 4, 15), vdec, vt), vload_f32(x, x0 + Q + j), pb)
    elif layout == 2:  # byte8
        row = qa[o]
        base = tb * T
        for j in range(0, T, 32):
            pa = vfma(_vdec(vload_u8(row, base + j), vdec, vt), vload_f32(x, x0 + j), pa)
            pb = vfma(_vdec(vload_u8(row, base + j + 16), vdec, vt),
                      vload_f32(x, x0 + j + 16), pb)
    elif layout == 3:  # 3-bit planes: byte j of each plane holds bit p of 8 codes
        Q = T // 8
        for j in range(0, Q, 16):
            c = _planes3_load(qa, o, tb, Q, j)
            for r in range(0, 8, 2):
                pa = vfma(_planes3_phase(c, r, vdec, vt), vload_f32(x, x0 + r * Q + j), pa)
                pb = vfma(_planes3_phase(c, r + 1, vdec, vt), vload_f32(x, x0 + (r + 1) * Q + j), pb)
    elif layout == 4:  # split6: a uint16 lane of q4 holds the 4-bit segments of all 4 phases
        Q = T // 4
        for j in range(0, Q, 16):
            w, s = _split6_load(qa, qb, o, tb, Q, j)
            pa = vfma(_split6_phase(w, s, 0, vdec, vt), vload_f32(x, x0 + j), pa)
            pb = vfma(_split6_phase(w, s, 1, vdec, vt), vload_f32(x, x0 + Q + j), pb)
            pa = vfma(_split6_phase(w, s, 2, vdec, vt), vload_f32(x, x0 + 2 * Q + j), pa)
            pb = vfma(_split6_phase(w, s, 3, vdec, vt), vload_f32(x, x0 + 3 * Q + j), pb)
    return pa, pb


@njit(inline="always")
def _planes3_load(qa, o, tb, Q, j):
    """Chunk ``j`` of tile ``tb`` of row ``o`` in the 3-bit planes layout: per lane the three plane
    bytes as ``p0 | p1 << 8 | p2 << 16`` (bit r of byte p = bit p of the lane's code r)."""
    row = qa[o]
    nb = qa.shape[1] // 3
    i = tb * Q + j
    return vor_shl(vor_shl(vload_u8(row, i), vload_u8(row, nb + i), 8), vload_u8(row, 2 * nb + i), 16)


@njit(inline="always")
def _planes3_phase(c, r, vdec, vt):
    """Decoded values of phase ``r``: bits r, r+8, r+16 of ``c`` gathered into a 3-bit code by
    one multiply (b0 + b1 2^8 + b2 2^16) * (1 + 2^7 + 2^14) holds b0 b1 b2 at bits 14-16, and no
    other partial product reaches bits 14-16."""
    return _vdec(vfield(vmul_k(vfield(c, r, 0x010101), 0x4081), 14, 7), vdec, vt)


@njit(inline="always")
def _split6_load(qa, qb, o, tb, Q, j):
    """Chunk ``j`` of tile ``tb`` of row ``o`` in the split6 layout: 16 uint16 lanes of ``q4``
    (the 4-bit segments of 4 phases) and 16 bytes of ``q2`` (their 2-bit segments)."""
    return vload_u16(qa[o], tb * 2 * Q + 2 * j), vload_u8(qb[o], tb * Q + j)


@njit(inline="always")
def _split6_phase(w, s, r, vdec, vt):
    """Decoded values of phase ``r`` of a split6 chunk: 6-bit code = 4-bit segment | 2-bit << 4."""
    return _vdec(vor_shl(vfield(w, 4 * r, 15), vfield(s, 2 * r, 3), 4), vdec, vt)


@njit(inline="always", fastmath=True)
def _vdecode_tile(layout, qa, qb, o, tb, T, vdec, vt, wbuf):
    """Decode tile ``tb`` of row ``o`` into ``wbuf[:T]`` (phase order, unscaled values) 16 lanes
    at a time: the vector twin of :func:`_decode_tile` for the batch 2..8 kernel, with the same
    decode as :func:`_vdot_tile` (values identical to the scalar decode)."""
    if layout == 0 or layout == 1:  # crumb2 (4 codes per byte) / nib4 (2 codes per byte)
        U = 4 if layout == 0 else 2
        width = 8 // U
        Q = T // U
        row = qa[o]
        base = tb * Q
        for j in range(0, Q, 16):
            b = vload_u8(row, base + j)
            for r in range(U):  # phase r: bits [width*r, width*(r+1)) of each byte
                vstore_f32(wbuf, r * Q + j, _vdec(vfield(b, width * r, (1 << width) - 1), vdec, vt))
    elif layout == 2:  # byte8
        row = qa[o]
        base = tb * T
        for j in range(0, T, 16):
            vstore_f32(wbuf, j, _vdec(vload_u8(row, base + j), vdec, vt))
    elif layout == 3:  # 3-bit planes
        Q = T // 8
        for j in range(0, Q, 16):
            c = _planes3_load(qa, o, tb, Q, j)
            for r in range(8):
                vstore_f32(wbuf, r * Q + j, _planes3_phase(c, r, vdec, vt))
    elif layout == 4:  # split6
        Q = T // 4
        for j in range(0, Q, 16):
            w, s = _split6_load(qa, qb, o, tb, Q, j)
            for r in range(4):
                vstore_f32(wbuf, r * Q + j, _split6_phase(w, s, r, vdec, vt))


@njit(inline="always")
def _layer_fields(p):
    """The fields of a :class:`Packed` layer every row kernel reads."""
    return p.qa, p.qb, p.per_row, p.scales, p.offsets, p.mult, p.add, p.T, p.tpg


@njit(inline="always", fastmath=True)
def _offset_term(srow, zrow, add, xsum):
    """sum_g (scale_g add + offset_g) sum(x_g): the affine part of a row, one short loop."""
    ys = np.float32(0.0)
    for g in range(srow.shape[0]):
        ys += (srow[g] * add + zrow[g]) * xsum[g]
    return ys


@njit(inline="always", fastmath=True)
def _gemv_rows_simd_b1(layout, p, vdec, ops, o0, o1):
    """Batch 1: y[o] = sum_g (scale_g mult) <codes_g, x_g> + (scale_g add + offset_g) sum(x_g),
    with the per-group dot kept in vector lanes and folded into a vector row accumulator
    (one horizontal sum per row)."""
    qa, qb, per_row, scales, offsets, mult, add, T, tpg = _layer_fields(p)
    xp, xsum, y = ops.xp, ops.xsum, ops.y
    ng = scales.shape[1]
    srow = np.empty(ng, np.float32)
    zrow = np.empty(ng, np.float32)
    n_tiles = xp.shape[1] // T
    x = xp[0]
    gm = mult * _vdec_mult(vdec)
    for o in range(o0, o1):
        vt = _vrow_table(vdec, o if per_row else 0)
        _load_row(scales, o, srow)
        _load_offsets(offsets, o, srow, zrow)
        acc = vzero()
        for g in range(ng):
            pa = vzero()
            pb = vzero()
            for t in range(min(tpg, n_tiles - g * tpg)):
                tb = g * tpg + t
                pa, pb = _vdot_tile(layout, qa, qb, o, tb, T, vdec, vt, x, tb * T, pa, pb)
            acc = vfma(vsplat(srow[g] * gm), vadd(pa, pb), acc)
        y[0, o] = vhsum(acc) + _offset_term(srow, zrow, add, xsum[0])


@njit(inline="always", fastmath=True)
def _gemv_rows_simd_bn(layout, p, vdec, ops, o0, o1):
    """Batch 2..8, explicit SIMD: per pass of up to four tokens, each tile is decoded once into
    ``wbuf`` (L1, :func:`_vdecode_tile`) and multiplied into four vector accumulators; the group
    scale is folded in per group as in :func:`_gemv_rows_simd_b1`. A pass of fewer than four
    tokens repeats its last token (results discarded). Replaces the auto-vectorized loops, whose
    scalar decode and per-tile reductions ran at ~2.5 multiply-adds per cycle."""
    qa, qb, per_row, scales, offsets, mult, add, T, tpg = _layer_fields(p)
    xp, xsum, y = ops.xp, ops.xsum, ops.y
    B = xp.shape[0]
    ng = scales.shape[1]
    srow = np.empty(ng, np.float32)
    zrow = np.empty(ng, np.float32)
    wbuf = np.empty(T, np.float32)
    n_tiles = xp.shape[1] // T
    gm = mult * _vdec_mult(vdec)
    for o in range(o0, o1):
        vt = _vrow_table(vdec, o if per_row else 0)
        _load_row(scales, o, srow)
        _load_offsets(offsets, o, srow, zrow)
        for b0 in range(0, B, 4):
            x0 = xp[b0]
            x1 = xp[min(b0 + 1, B - 1)]
            x2 = xp[min(b0 + 2, B - 1)]
            x3 = xp[min(b0 + 3, B - 1)]
            a0 = vzero()
            a1 = vzero()
            a2 = vzero()
            a3 = vzero()
            for g in range(ng):
                p0 = vzero()
                p1 = vzero()
                p2 = vzero()
                p3 = vzero()
                for t in range(min(tpg, n_tiles - g * tpg)):
                    tb = g * tpg + t
                    _vdecode_tile(layout, qa, qb, o, tb, T, vdec, vt, wbuf)
                    base = tb * T
                    for j in range(0, T, 16):
                        w = vload_f32(wbuf, j)
                        p0 = vfma(w, vload_f32(x0, base + j), p0)
                        p1 = vfma(w, vload_f32(x1, base + j), p1)
                        p2 = vfma(w, vload_f32(x2, base + j), p2)
                        p3 = vfma(w, vload_f32(x3, base + j), p3)
                s = vsplat(srow[g] * gm)
                a0 = vfma(s, p0, a0)
                a1 = vfma(s, p1, a1)
                a2 = vfma(s, p2, a2)
                a3 = vfma(s, p3, a3)
            y[b0, o] = vhsum(a0) + _offset_term(srow, zrow, add, xsum[b0])
            if b0 + 1 < B:
                y[b0 + 1, o] = vhsum(a1) + _offset_term(srow, zrow, add, xsum[b0 + 1])
            if b0 + 2 < B:
                y[b0 + 2, o] = vhsum(a2) + _offset_term(srow, zrow, add, xsum[b0 + 2])
            if b0 + 3 < B:
                y[b0 + 3, o] = vhsum(a3) + _offset_term(srow, zrow, add, xsum[b0 + 3])


# ------------------------------------------------------ wide explicit-SIMD batch-1 path (FP6)
# The kernel above loads 16 bytes per step and decodes FP6 with a 5-bit ``vpermi2ps`` plus a
# sign fix-up, ~8 vector operations per 16 codes. Here a 16-bit lane holds 4 consecutive codes'
# nibbles (``q4``) and the matching zero-extended ``q2`` byte their crumbs, so one 64-byte load
# of ``q4`` and one 32-byte load of ``q2`` feed 8 phases of 16 float lanes; the activations are
# phase-ordered with U = 8 to match (code ``8l + k`` of a tile at ``k*(T/8) + l``). Measured
# (single core, 11008x4096 FP6 streamed from DRAM, shared machine): 4.0 ms -> 3.0 ms. The same
# 32-bit-lane layout for int4 was faster with the matrix in L2 but slower than the kernel above
# when streaming from DRAM, and two rows per pass (shared x loads) was slower from DRAM for both
# (two interleaved streams per thread), so int4 keeps the kernel above and this one runs one
# row at a time.
WIDE_UNIT = 8  # codes per 32-bit lane = phase-order unit of the wide kernel
# software prefetch distance along a row's code streams; 512 bytes measured better than
# 0 / 1024 / 2048 for FP6 (noisy shared machine)
PREFETCH_BYTES = 512
# the int4 kernel above streams a single row of nibbles: the distance must cover the DRAM latency at
# its higher code rate (2 KB measured best of 0.5-2 KB with the weights cold; docs/kernels.md item 10)
NIB4_PREFETCH_BYTES = 2048


def _wide_split6(ra, rb, tb, T, j, vdec, vt, x, pa, pb):
    raise NotImplementedError


@overload(_wide_split6, inline="always")
def _ov_wide_split6(ra, rb, tb, T, j, vdec, vt, x, pa, pb):
    """bf16 word tables (what QuantLinear passes) take :func:`_wide_step6`; any other decode
    descriptor (only reachable by calling ``qgemv`` directly) the generic 32-bit lanes."""
    if isinstance(vdec, types.Array) and vdec.dtype == types.uint8:
        return lambda ra, rb, tb, T, j, vdec, vt, x, pa, pb: _wide_step6(ra, rb, tb, T, j, vt,
                                                                         x, pa, pb)

    def generic(ra, rb, tb, T, j, vdec, vt, x, pa, pb):
        Q = T // WIDE_UNIT
        xo = tb * T + j
        w = vload_u32(ra, tb * (T // 2) + 4 * j)  # q4 dword l and q2 uint16 l: codes 8l..8l+7
        s = vload_u16(rb, tb * (T // 4) + 2 * j)
        for h in range(4):
            c = vor_shl(vfield(w, 8 * h, 15), vfield(s, 4 * h, 3), 4)
            pa = vfma(_vdec(c, vdec, vt), vload_f32(x, xo + 2 * h * Q), pa)
            c = vor_shl(vfield(w, 8 * h + 4, 15), vfield(s, 4 * h + 2, 3), 4)
            pb = vfma(_vdec(c, vdec, vt), vload_f32(x, xo + (2 * h + 1) * Q), pb)
        return pa, pb
    return generic


@njit(inline="always", fastmath=True)
def _wide_step6(ra, rb, tb, T, j, vt, x, pa, pb):
    """(pa, pb) += 128 FP6 codes of one row (lanes ``j..j+15`` of tile ``tb``, 8 phases) times
    their activations. Every FP6 (E3M2, E2M3) and int6 value is exact in bfloat16, so one
    ``vpermi2w`` on the full 6-bit code (64-entry table in two registers, sign included)
    decodes 32 codes; the low / high half of each 32-bit lane (codes ``8l + k`` and
    ``8l + 4 + k``) is a float32 after a shift / mask: ~4 vector operations per 16 codes."""
    Q = T // WIDE_UNIT
    xo = tb * T + j
    w = vload_u32(ra, tb * (T // 2) + 4 * j)   # 16-bit lane m: codes 4m..4m+3 (nibbles)
    s = vload_u8w(rb, tb * (T // 4) + 2 * j)   # 16-bit lane m: the same codes' crumbs
    prefetch(ra, tb * (T // 2) + 4 * j + PREFETCH_BYTES)
    prefetch(rb, tb * (T // 4) + 2 * j + PREFETCH_BYTES // 2)
    for k in range(4):  # constant trip count: unrolled, shift amounts become immediates
        v = vperm64w(vt[0], vt[1], vcode6w(w, s, k))
        pa = vfma(vbf16_even(v), vload_f32(x, xo + k * Q), pa)
        pb = vfma(vbf16_odd(v), vload_f32(x, xo + (4 + k) * Q), pb)
    return pa, pb


@njit(inline="always", fastmath=True)
def _gemv_rows_wide_b1(p, vdec, ops, o0, o1):
    """Batch 1 FP6 (split6), one row at a time so the code streams are read sequentially.
    Needs T % 128 == 0 and xp phase-ordered with ``WIDE_UNIT``."""
    qa, qb, per_row, scales, offsets, mult, add, T, tpg = _layer_fields(p)
    xp, xsum, y = ops.xp, ops.xsum, ops.y
    ng = scales.shape[1]
    srow = np.empty(ng, np.float32)
    zrow = np.empty(ng, np.float32)
    n_tiles = xp.shape[1] // T
    Q = T // WIDE_UNIT
    x = xp[0]
    xs = xsum[0]
    for o in range(o0, o1):
        _load_row(scales, o, srow)
        vt = _vrow_table(vdec, o if per_row else 0)
        ra = qa[o]
        rb = qb[o]
        acc = vzero()
        for g in range(ng):
            pa, pb = vzero(), vzero()
            for t in range(min(tpg, n_tiles - g * tpg)):
                tb = g * tpg + t
                for j in range(0, Q, 16):
                    pa, pb = _wide_split6(ra, rb, tb, T, j, vdec, vt, x, pa, pb)
            acc = vfma(vsplat(srow[g] * mult), vadd(pa, pb), acc)
        _load_offsets(offsets, o, srow, zrow)
        y[0, o] = vhsum(acc) + _offset_term(srow, zrow, add, xs)


# --------------------------------------------------------------------------------- row kernels
@njit(inline="always", fastmath=True)
def _gemv_rows_scalar(layout, p, ops, o0, o1):
    """Auto-vectorized loops: batch 1 fused decode + dot, batch 2..8 decode a tile once into
    ``wbuf`` and reuse it for four tokens per pass."""
    qa, qb, per_row, scales, offsets, mult, add, T, tpg = _layer_fields(p)
    bits, dec = p.bits, p.dec
    xp, xsum, y = ops.xp, ops.xsum, ops.y
    B = xp.shape[0]
    ng = scales.shape[1]
    srow = np.empty(ng, np.float32)
    zrow = np.empty(ng, np.float32)
    wbuf = np.empty(T, np.float32)
    cbuf = np.empty(T // 8 + 1, np.int32)
    acc = np.zeros(B, np.float32)
    n_pad = xp.shape[1]
    n_tiles = n_pad // T
    nb_plane = n_pad // 8
    for o in range(o0, o1):
        tt = _row_table(dec, o if per_row else 0)
        _load_row(scales, o, srow)
        _load_offsets(offsets, o, srow, zrow)
        for b in range(B):
            y[b, o] = 0.0
        for g in range(ng):
            es = srow[g] * mult
            ez = srow[g] * add + zrow[g]
            if B == 1 and (layout != 3 or bits == 3):
                a1 = np.float32(0.0)
                for t in range(min(tpg, n_tiles - g * tpg)):
                    x0 = (g * tpg + t) * T
                    a1 += _dot_tile_b1(layout, qa, qb, o, g * tpg + t, T, dec, tt,
                                       xp[0, x0:x0 + T])
                y[0, o] += es * a1 + ez * xsum[0, g]
                continue
            for b in range(B):
                acc[b] = 0.0
            for t in range(min(tpg, n_tiles - g * tpg)):
                tb = g * tpg + t
                x0 = tb * T
                _decode_tile(layout, bits, qa, qb, o, tb, T, nb_plane, dec, tt, wbuf, cbuf)
                b = 0
                while b + 4 <= B:  # four tokens per pass share each decoded weight load
                    xr0 = xp[b, x0:x0 + T]
                    xr1 = xp[b + 1, x0:x0 + T]
                    xr2 = xp[b + 2, x0:x0 + T]
                    xr3 = xp[b + 3, x0:x0 + T]
                    a0 = np.float32(0.0)
                    a1 = np.float32(0.0)
                    a2 = np.float32(0.0)
                    a3 = np.float32(0.0)
                    for j in range(T):
                        w = wbuf[j]
                        a0 += w * xr0[j]
                        a1 += w * xr1[j]
                        a2 += w * xr2[j]
                        a3 += w * xr3[j]
                    acc[b] += a0
                    acc[b + 1] += a1
                    acc[b + 2] += a2
                    acc[b + 3] += a3
                    b += 4
                while b < B:
                    xr = xp[b, x0:x0 + T]
                    a = np.float32(0.0)
                    for j in range(T):
                        a += wbuf[j] * xr[j]
                    acc[b] += a
                    b += 1
            for b in range(B):
                y[b, o] += es * acc[b] + ez * xsum[b, g]


@njit(inline="always", fastmath=True)
def _dequant_rows_body(layout, p, W, unit, o0, o1):
    """Rows o0..o1 of the dequantized matrix into ``W`` (natural column order)."""
    qa, qb, per_row, scales, offsets, mult, add, T, tpg = _layer_fields(p)
    bits, dec = p.bits, p.dec
    n_pad = W.shape[1]
    ng = scales.shape[1]
    n_tiles = n_pad // T
    nb_plane = n_pad // 8
    Q = T // unit
    wbuf = np.empty(T, np.float32)
    cbuf = np.empty(T // 8 + 1, np.int32)
    srow = np.empty(ng, np.float32)
    zrow = np.empty(ng, np.float32)
    for o in range(o0, o1):
        tt = _row_table(dec, o if per_row else 0)
        _load_row(scales, o, srow)
        _load_offsets(offsets, o, srow, zrow)
        for g in range(ng):
            es = srow[g] * mult
            ez = srow[g] * add + zrow[g]
            for t in range(min(tpg, n_tiles - g * tpg)):
                tb = g * tpg + t
                _decode_tile(layout, bits, qa, qb, o, tb, T, nb_plane, dec, tt, wbuf, cbuf)
                row = W[o, tb * T:tb * T + T]
                for r in range(unit):
                    for j in range(Q):
                        row[unit * j + r] = wbuf[r * Q + j] * es + ez


# ------------------------------------------------------------------- per-layout entry points
class Packed(NamedTuple):
    """What the kernels read of a packed layer, by name (built by ``QuantLinear._fast_args``).

    ``layout``: :data:`LAYOUT_ID` of the code layout; ``bits``: code width; ``qa``/``qb``: code
    bytes (``qb`` the 2-bit segments of split6, else a 1x1 dummy); ``dec``: scalar decode
    descriptor (see ``_val``); ``per_row``: ``dec`` has one table row per output row;
    ``scales``/``offsets``: per-group arrays (see ``_load_row``); ``mult``/``add``: the decode
    rule's affine fold (value = table value * mult + add before the group scale); ``T``: codes
    per kernel tile; ``tpg``: tiles per scale group."""
    layout: int
    bits: int
    qa: np.ndarray
    qb: np.ndarray
    dec: Any
    per_row: bool
    scales: np.ndarray
    offsets: Any
    mult: np.float32
    add: np.float32
    T: int
    tpg: int


class Operands(NamedTuple):
    """One product's activations and output: ``xp`` float32 (B, n_pad) phase-ordered
    activations, ``xsum`` float32 (B, n_groups) their group sums, ``y`` float32 (B, out)."""
    xp: np.ndarray
    xsum: np.ndarray
    y: np.ndarray


# Kernel paths a product can take (``qgemv``'s ``path``).
PATH_LOOPS, PATH_SIMD, PATH_WIDE = 0, 1, 2

# One set of entry points per layout, with the layout id a literal in the source: numba prunes the
# other layouts' branches before LLVM sees them (2x faster than a runtime id; a
# ``numba.literally()`` specialization did not get the same pruning). The row functions are
# separate (non-parallel) functions so their scratch buffers are private to each task, and each
# kernel path (batch-1 SIMD, batch-n SIMD, loops, wide FP6) is its own compiled function called
# once per task of ROWS_PER_TASK rows: numba's inliner deep-copies the callee's IR once per block
# with the whole variable scope, so inlining the union of all paths into one row function made
# the cold compile ~1.6x longer (``benchmarks/kernels_compile.py``). The loops path does not take
# the vector decode table, so its compiled code is shared by specializations that differ only in
# that table (the batch-1 wide FP6 table vs the 16-lane one).
#
# The entry points are written once, in ``_PER_LAYOUT`` below, and made per layout by compiling
# the filled-in text with this file's name: numba's disk cache locates, stamps and names an entry
# by its source file, qualified name and line, all of which are then those of this file. A
# closure factory would not cache: numba keys a closure's cache entry on its pickled cells, and a
# cell holding another dispatcher pickles differently in every process.
_PER_LAYOUT = '''
@njit(fastmath=True, cache=True)
def _gemv_b1_{name}(p, vdec, ops, o0, o1):
    _gemv_rows_simd_b1({lid}, p, vdec, ops, o0, o1)


@njit(fastmath=True, cache=True)
def _gemv_bn_{name}(p, vdec, ops, o0, o1):
    _gemv_rows_simd_bn({lid}, p, vdec, ops, o0, o1)


@njit(fastmath=True, cache=True)
def _gemv_loops_{name}(p, ops, o0, o1):
    _gemv_rows_scalar({lid}, p, ops, o0, o1)
{wide_def}

@njit(nogil=True, cache=True)
def _gemv_work_{name}(p, vdec, path, ops, ctr):
    """Claims tasks of ROWS_PER_TASK output rows from ``ctr[0]`` until none is left, counting
    finished ones in ``ctr[1]``; ``path``: PATH_LOOPS / PATH_SIMD / PATH_WIDE."""
    B = ops.xp.shape[0]
    n_out = ops.y.shape[1]
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    while True:
        k = _atomic_add(ctr, 0, 1)
        if k >= n_tasks:
            break
        o0 = k * ROWS_PER_TASK
        o1 = min(n_out, o0 + ROWS_PER_TASK)
        if B == 1 and path == PATH_WIDE:
            {wide_call}
        elif B == 1 and path == PATH_SIMD:
            _gemv_b1_{name}(p, vdec, ops, o0, o1)
        elif path == PATH_SIMD:
            _gemv_bn_{name}(p, vdec, ops, o0, o1)
        else:
            _gemv_loops_{name}(p, ops, o0, o1)
        _atomic_add(ctr, 1, 1)


@njit(nogil=True, fastmath=True, cache=True)
def _dequant_work_{name}(p, W, unit, ctr):
    """Claims tasks of ROWS_PER_TASK rows of ``W`` from ``ctr`` like the product's task loop."""
    n_out = W.shape[0]
    n_tasks = (n_out + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    while True:
        k = _atomic_add(ctr, 0, 1)
        if k >= n_tasks:
            break
        o0 = k * ROWS_PER_TASK
        _dequant_rows_body({lid}, p, W, unit, o0, min(n_out, o0 + ROWS_PER_TASK))
        _atomic_add(ctr, 1, 1)
'''
_WIDE_DEF = '''

@njit(fastmath=True, cache=True)
def _gemv_wide_{name}(p, vdec, ops, o0, o1):
    _gemv_rows_wide_b1(p, vdec, ops, o0, o1)
'''


def _define_layout_entries(name: str, lid: int) -> None:
    wide = name == "split6"  # the wide batch-1 kernel exists for FP6's 4+2 split only
    text = _PER_LAYOUT.format(
        name=name, lid=lid, wide_def=_WIDE_DEF.format(name=name) if wide else "",
        wide_call=(f"_gemv_wide_{name}(p, vdec, ops, o0, o1)" if wide
                   else f"_gemv_loops_{name}(p, ops, o0, o1)"))
    exec(compile(text, __file__, "exec"), globals())


for _name, _lid in LAYOUT_ID.items():
    _define_layout_entries(_name, _lid)

_GEMV = tuple(globals()[f"_gemv_work_{n}"] for n in LAYOUT_ID)
_DEQUANT = tuple(globals()[f"_dequant_work_{n}"] for n in LAYOUT_ID)


def qgemv(p: Packed, xp, xsum, y, vdec=None, path: int = PATH_LOOPS) -> None:
    """``y[b] = W_hat @ x[b]`` for the layer ``p``, from phase-ordered activations ``xp`` and
    their group sums ``xsum`` (:func:`phase_order`), on torch's OpenMP team (else the caller and
    helper threads). ``vdec``: the vector decode descriptor of the explicit-SIMD paths."""
    _run_tasks(_GEMV[p.layout], (p, vdec, int(path), Operands(xp, xsum, y)), y.shape[1])


def _run_tasks(fn, args: tuple, n_rows: int) -> None:
    """``fn(*args, ctr)`` on torch's OpenMP team (else the caller and helper threads): every call
    claims tasks of ROWS_PER_TASK of the ``n_rows`` output rows from ``ctr`` until none is left."""
    ctr = np.zeros(2, np.int64)  # [next task to claim, tasks finished]
    n_tasks = (n_rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK
    if team.available():
        n = min(team.n_threads(), n_tasks)
        if n > 1:
            team.run(fn, args + (ctr,), n)
        else:
            fn(*args, ctr)
        return
    n_helpers = min(get_num_threads() - 1, n_tasks - 1)
    futures = [_helper_pool(n_helpers).submit(fn, *args, ctr) for _ in range(max(n_helpers, 0))]
    fn(*args, ctr)
    while ctr[1] < n_tasks:  # a helper is finishing a task it claimed
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()
        time.sleep(0)


_POOL = None


def _helper_pool(n):
    global _POOL
    if _POOL is None or _POOL._max_workers < n:
        _POOL = ThreadPoolExecutor(max_workers=max(n, 1), thread_name_prefix="kernels-gemv")
    return _POOL


def qdequant(p: Packed, W, unit) -> None:
    """Write the dequantized (out, n_pad) float32 matrix into ``W`` (natural column order);
    ``unit``: codes per storage unit of the layout (its phase count)."""
    _run_tasks(_DEQUANT[p.layout], (p, W, int(unit)), W.shape[0])


@njit(cache=True)
def add_outliers(y, x, rows, cols, vals):
    """y[b, rows[k]] += vals[k] * x[b, cols[k]] (sparse full-precision part)."""
    for k in range(rows.shape[0]):
        o = rows[k]
        i = cols[k]
        v = vals[k]
        for b in range(y.shape[0]):
            y[b, o] += v * x[b, i]


@njit(cache=True)
def phase_order(x, n_pad, T, U, group, n_groups):
    """(xp, xsum): x (B, n) zero-padded to n_pad and permuted per tile of T so that element
    ``U*j + r`` of a tile sits at ``r*(T/U) + j``; xsum (B, n_groups) float32 group sums
    (accumulated in float64)."""
    B, n = x.shape
    Q = T // U
    xp = np.zeros((B, n_pad), np.float32)
    xsum = np.zeros((B, n_groups), np.float32)
    for b in range(B):
        for tb in range(n_pad // T):
            base = tb * T
            if base + T <= n:  # whole tile: contiguous writes, no bounds test
                xt = x[b, base:base + T]
                pt = xp[b, base:base + T]
                for r in range(U):
                    for j in range(Q):
                        pt[r * Q + j] = xt[U * j + r]
                continue
            for j in range(Q):
                for r in range(U):
                    i = base + U * j + r
                    if i < n:
                        xp[b, base + r * Q + j] = x[b, i]
        for g in range(n_groups):
            s = 0.0
            for i in range(g * group, min(n, (g + 1) * group)):
                s += x[b, i]
            xsum[b, g] = s
    return xp, xsum
