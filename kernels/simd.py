"""A tiny explicit-SIMD vocabulary for numba: 16-lane float32 / int32 vector values.

LLVM's auto-vectorizer handles the simple loops in :mod:`kernels.cpu`, but a matrix-vector
product over groups needs a vector accumulator that lives across groups (one horizontal sum per
row, not one per group) and table decodes by register permutes; neither can be expressed as a
plain numba loop. These intrinsics give numba two value types, ``f32v`` (``<16 x float>``) and
``i32v`` (``<16 x i32>``), kept in registers like any scalar, plus the handful of operations the
dequant-dot kernels need. Everything is portable LLVM IR except the table lookups, which take
one of three code paths chosen once per process (:data:`ISA`):

- ``avx512``: ``vpermps`` / ``vpermi2ps`` on 16 lanes, ``vpermi2w`` on 32 16-bit lanes;
- ``avx2``: 8-lane ``vpermps``; a 16-entry table is two 8-lane lookups and a blend on bit 3
  of the code, a 32-entry table two of those and a blend on bit 4;
- ``portable``: a select tree on the code's bits over broadcast table entries (plain
  ``select``/``shufflevector`` IR, which LLVM lowers to blends on x86 and ``bsl`` on NEON).

The host's features pick the path (``avx512`` needs AVX-512F+BW, ``avx2`` needs AVX2+FMA);
``ADVISOR_KERNEL_ISA`` forces a path the host can run (tests and benchmarks use it). Compiled
kernels are cached on disk per path (:func:`_install_cache_locator`), so a forced path never
reuses another path's machine code.
"""
from __future__ import annotations

import os

import llvmlite.binding as llvm
from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic, models, register_model

V = 16  # lanes
_F = ir.FloatType()
_I = ir.IntType(32)
_FV = ir.VectorType(_F, V)
_IV = ir.VectorType(_I, V)
_F8 = ir.VectorType(_F, 8)
_I8 = ir.VectorType(_I, 8)

ISA_PATHS = ("avx512", "avx2", "portable")  # fastest first
ISA_ENV = "ADVISOR_KERNEL_ISA"
_NEEDS = {"avx512": ("avx512f", "avx512bw", "fma"), "avx2": ("avx2", "fma"), "portable": ()}


def host_features() -> dict[str, bool]:
    """LLVM's view of the host CPU's features (empty when it cannot be queried)."""
    try:
        return dict(llvm.get_host_cpu_features())
    except Exception:  # pragma: no cover - feature query unavailable
        return {}


def runnable_paths(features: dict[str, bool] | None = None) -> list[str]:
    """The ISA paths this host can run, fastest first."""
    f = host_features() if features is None else features
    return [p for p in ISA_PATHS if all(f.get(n, False) for n in _NEEDS[p])]


def select_isa(requested: str | None = None, features: dict[str, bool] | None = None) -> str:
    """The path to compile: ``requested`` (or ``$ADVISOR_KERNEL_ISA``) if the host runs it,
    else the host's fastest. A requested path the host cannot run is an error."""
    ok = runnable_paths(features)
    req = (os.environ.get(ISA_ENV) if requested is None else requested) or ""
    req = req.strip().lower()
    if not req or req == "auto":
        return ok[0]
    if req not in ISA_PATHS:
        raise ValueError(f"error: {ISA_ENV}={req!r} is not a kernel path; use one of "
                         f"{', '.join(ISA_PATHS)} or auto")
    if req not in ok:
        raise ValueError(f"error: {ISA_ENV}={req} needs CPU features {', '.join(_NEEDS[req])}, "
                         f"which this host lacks; it can run {', '.join(ok)}")
    return req


ISA = select_isa()
HAS_AVX512 = ISA == "avx512"


def _install_cache_locator() -> None:
    """Keep numba's on-disk cache of this package's kernels in a folder per ISA path.

    numba keys a cache entry on the signature and the host CPU, not on module globals such as
    :data:`ISA` that the intrinsics read at code generation; without this, forcing a path would
    load the machine code of the path compiled first. Files outside this folder keep numba's
    own locators."""
    from numba.core import caching, config

    here = os.path.dirname(os.path.abspath(__file__))

    class IsaCacheLocator(caching.InTreeCacheLocator):
        """numba's in-tree (or ``NUMBA_CACHE_DIR``, or user-wide) cache folder + ``isa-<path>``."""

        def __init__(self, py_func, py_file, base):
            super().__init__(py_func, py_file)
            self._cache_path = os.path.join(base, f"isa-{ISA}")

        @classmethod
        def from_function(cls, py_func, py_file):
            if os.path.dirname(os.path.abspath(py_file)) != here:
                return None
            for locator in (caching.UserProvidedCacheLocator, caching.InTreeCacheLocator,
                            caching.UserWideCacheLocator):
                try:
                    base = locator.from_function(py_func, py_file)
                except Exception:  # pragma: no cover - a locator that cannot apply here
                    base = None
                if base is None:
                    continue
                self = cls(py_func, py_file, base.get_cache_path())
                try:
                    self.ensure_cache_path()
                except OSError:
                    continue
                return self
            return None

    classes = caching.CacheImpl._locator_classes
    if not any(c.__name__ == "IsaCacheLocator" for c in classes):
        classes.insert(0, IsaCacheLocator)


_install_cache_locator()


class F32V(types.Type):
    def __init__(self):
        super().__init__(name="f32x16")


class I32V(types.Type):
    def __init__(self):
        super().__init__(name="i32x16")


f32v = F32V()
i32v = I32V()


@register_model(F32V)
class _F32VModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _FV)


@register_model(I32V)
class _I32VModel(models.PrimitiveModel):
    def __init__(self, dmm, fe_type):
        super().__init__(dmm, fe_type, _IV)


def _as_i32(builder, v):
    w = v.type.width
    if w == 32:
        return v
    return builder.trunc(v, _I) if w > 32 else builder.zext(v, _I)


def _splat(builder, v, vty):
    undef = ir.Constant(vty, ir.Undefined)
    v0 = builder.insert_element(undef, v, ir.Constant(_I, 0))
    return builder.shuffle_vector(v0, undef, ir.Constant(_IV, [0] * V))


def _ivec(k):
    return ir.Constant(_IV, [k] * V)


def _ptr_at(context, builder, aty, arr, idx, elty):
    a = context.make_array(aty)(context, builder, arr)
    return builder.bitcast(builder.gep(a.data, [idx]), elty.as_pointer())


def _load(vec, align, widen=None):
    """Codegen of the vector loads: a ``vec`` at element ``i`` of a 1-D array, then zero-extended
    to ``widen`` (and viewed as the 512-bit ``i32v``) when given."""
    def codegen(context, builder, sig, args):
        v = builder.load(_ptr_at(context, builder, sig.args[0], args[0], args[1], vec), align=align)
        if widen is None:
            return v
        v = builder.zext(v, widen)
        return v if widen == _IV else builder.bitcast(v, _IV)
    return codegen


@intrinsic
def vzero(typingctx):
    """All-zero float vector."""
    def codegen(context, builder, sig, args):
        return ir.Constant(_FV, [0.0] * V)
    return f32v(), codegen


@intrinsic
def vsplat(typingctx, x):
    """Broadcast a float32 scalar."""
    def codegen(context, builder, sig, args):
        return _splat(builder, args[0], _FV)
    return f32v(types.float32), codegen


@intrinsic
def vfma(typingctx, a, b, c):
    """a * b + c per lane (fused)."""
    def codegen(context, builder, sig, args):
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_FV, [_FV] * 3),
                                            "llvm.fma.v16f32")
        return builder.call(fn, args)
    return f32v(f32v, f32v, f32v), codegen


@intrinsic
def vadd(typingctx, a, b):
    def codegen(context, builder, sig, args):
        return builder.fadd(*args)
    return f32v(f32v, f32v), codegen


@intrinsic
def vhsum(typingctx, a):
    """Sum of the 16 lanes (pairwise tree)."""
    def codegen(context, builder, sig, args):
        v = args[0]
        n = V
        while n > 1:
            n //= 2
            lo = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I, n), list(range(n))))
            hi = builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I, n),
                                                          list(range(n, 2 * n))))
            v = builder.fadd(lo, hi)
        return builder.extract_element(v, ir.Constant(_I, 0))
    return types.float32(f32v), codegen


@intrinsic
def vload_f32(typingctx, arr, i):
    """arr[i:i+16] of a contiguous 1-D float32 array (unaligned)."""
    return f32v(arr, i), _load(_FV, 4)


@intrinsic
def vstore_f32(typingctx, arr, i, v):
    """arr[i:i+16] = v for a contiguous 1-D float32 array (unaligned)."""
    def codegen(context, builder, sig, args):
        builder.store(args[2], _ptr_at(context, builder, sig.args[0], args[0], args[1], _FV), align=4)
        return context.get_dummy_value()
    return types.none(arr, i, f32v), codegen


@intrinsic
def vload_u8(typingctx, arr, i):
    """16 bytes arr[i:i+16] of a contiguous 1-D uint8 array, zero-extended to 32-bit lanes."""
    return i32v(arr, i), _load(ir.VectorType(ir.IntType(8), V), 1, _IV)


@intrinsic
def vload_u16(typingctx, arr, i):
    """32 bytes from byte ``i`` of a uint8 array as 16 little-endian uint16 lanes
    (``arr[i+2j] | arr[i+2j+1] << 8``), zero-extended."""
    return i32v(arr, i), _load(ir.VectorType(ir.IntType(16), V), 1, _IV)


@intrinsic
def vload_u32(typingctx, arr, i):
    """64 bytes from byte ``i`` of a uint8 array as 16 little-endian 32-bit lanes: one plain
    vector load (no widening shuffle); lane ``l`` holds bytes ``i+4l .. i+4l+3``."""
    return i32v(arr, i), _load(_IV, 1)


@intrinsic
def prefetch(typingctx, arr, i):
    """Hint that byte ``i`` of a 1-D uint8 array will be read soon (``prefetcht0``; an address
    past the end is harmless: a prefetch never faults)."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        p = builder.bitcast(builder.gep(a.data, [args[1]]), ir.IntType(8).as_pointer())
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [p.type, _I, _I, _I]),
            "llvm.prefetch.p0i8")
        builder.call(fn, [p, ir.Constant(_I, 0), ir.Constant(_I, 3), ir.Constant(_I, 1)])
        return context.get_dummy_value()
    return types.none(arr, i), codegen


@intrinsic
def vfield(typingctx, v, shift, mask):
    """(v >> shift) & mask per lane."""
    def codegen(context, builder, sig, args):
        sh = _splat(builder, _as_i32(builder, args[1]), _IV)
        mk = _splat(builder, _as_i32(builder, args[2]), _IV)
        return builder.and_(builder.lshr(args[0], sh), mk)
    return i32v(i32v, shift, mask), codegen


@intrinsic
def vmul_k(typingctx, a, k):
    """a * k per int32 lane (low 32 bits)."""
    def codegen(context, builder, sig, args):
        return builder.mul(args[0], _splat(builder, _as_i32(builder, args[1]), _IV))
    return i32v(i32v, k), codegen


@intrinsic
def vor_shl(typingctx, a, b, k):
    """a | (b << k) per lane."""
    def codegen(context, builder, sig, args):
        kk = _splat(builder, _as_i32(builder, args[2]), _IV)
        return builder.or_(args[0], builder.shl(args[1], kk))
    return i32v(i32v, i32v, k), codegen


@intrinsic
def vtof(typingctx, v):
    """float32 of int32 lanes."""
    def codegen(context, builder, sig, args):
        return builder.sitofp(args[0], _FV)
    return f32v(i32v), codegen


@intrinsic
def vexmy(typingctx, c, n_exp, n_man, bias):
    """Value of sign-magnitude ExMy codes (subnormals, no Inf/NaN) built from their bits; the
    vector form of :func:`kernels.cpu._exmy_to_f32`."""
    def codegen(context, builder, sig, args):
        cc = args[0]
        ne, nm, bi = (_splat(builder, _as_i32(builder, a), _IV) for a in args[1:])
        one = _ivec(1)
        em = builder.add(ne, nm)
        mag = builder.and_(cc, builder.sub(builder.shl(one, em), one))
        bits = builder.add(builder.shl(mag, builder.sub(_ivec(23), nm)),
                           builder.shl(builder.sub(_ivec(127), bi), _ivec(23)))
        f = builder.bitcast(bits, _FV)
        two_pow = builder.bitcast(builder.shl(builder.sub(_ivec(128), bi), _ivec(23)), _FV)
        sub = builder.fsub(builder.fadd(f, f), two_pow)
        is_sub = builder.icmp_unsigned("<", mag, builder.shl(one, nm))
        v = builder.bitcast(builder.select(is_sub, sub, f), _IV)
        sign = builder.and_(builder.shl(cc, builder.sub(_ivec(31), em)), _ivec(-2 ** 31))
        return builder.bitcast(builder.or_(v, sign), _FV)
    return f32v(i32v, n_exp, n_man, bias), codegen


def _half(builder, v, h, n=8):
    """Lanes ``h*n .. h*n+n-1`` of a 16-lane vector."""
    return builder.shuffle_vector(v, v, ir.Constant(ir.VectorType(_I, n),
                                                    list(range(h * n, h * n + n))))


def _join(builder, a, b):
    """Two 8-lane vectors as one 16-lane vector."""
    return builder.shuffle_vector(a, b, ir.Constant(_IV, list(range(2 * 8))))


def _has_bit(builder, k, bit):
    zero = ir.Constant(k.type, [0] * k.type.count)
    return builder.icmp_unsigned("!=", builder.and_(k, ir.Constant(k.type, [1 << bit] * k.type.count)),
                                 zero)


def _avx2_lookup(builder, tables, k):
    """``(tables[0] ++ tables[1] ...)[k]`` per lane from 8-lane ``vpermps`` lookups (which read
    the low 3 bits of ``k``), blended on bits 3 and 4 of the code."""
    fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_F8, [_F8, _I8]),
                                        "llvm.x86.avx2.permps")
    eights = [t8 for t in tables for t8 in (_half(builder, t, 0), _half(builder, t, 1))]
    out = []
    for h in range(2):
        kh = _half(builder, k, h)
        vals = [builder.call(fn, [t8, kh]) for t8 in eights]  # table entries 8m .. 8m+7
        bit = 3
        while len(vals) > 1:
            sel = _has_bit(builder, kh, bit)
            vals = [builder.select(sel, vals[m + 1], vals[m]) for m in range(0, len(vals), 2)]
            bit += 1
        out.append(vals[0])
    return _join(builder, out[0], out[1])


def _select_tree(builder, tables, k, n_bits):
    """Portable lookup: a binary select tree on the bits of ``k`` over the table entries, each
    broadcast to all lanes (shuffles with constant masks and selects only)."""
    entries = []
    for t in tables:
        for e in range(V):
            entries.append(builder.shuffle_vector(t, t, ir.Constant(_IV, [e] * V)))
    vals = entries[:1 << n_bits]
    bit = 0
    while len(vals) > 1:
        sel = _has_bit(builder, k, bit)
        vals = [builder.select(sel, vals[m + 1], vals[m]) for m in range(0, len(vals), 2)]
        bit += 1
    return vals[0]


def _lookup(builder, tables, k, n_bits):
    """``(tables ...)[k & (2**n_bits - 1)]`` per lane on the ISA path's instructions."""
    if ISA == "avx512":
        if len(tables) == 1:
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_FV, [_FV, _IV]), "llvm.x86.avx512.permvar.sf.512")
            return builder.call(fn, [tables[0], k])
        fn = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(_FV, [_FV, _IV, _FV]),
            "llvm.x86.avx512.vpermi2var.ps.512")
        return builder.call(fn, [tables[0], k, tables[1]])
    if ISA == "avx2":
        return _avx2_lookup(builder, tables, k)
    return _select_tree(builder, tables, k, n_bits)


@intrinsic
def vperm16(typingctx, table, idx):
    """``table[idx & 15]`` per lane for a 16-entry register table."""
    def codegen(context, builder, sig, args):
        return _lookup(builder, [args[0]], args[1], 4)
    return f32v(f32v, i32v), codegen


@intrinsic
def vperm32(typingctx, lo, hi, idx):
    """``(lo ++ hi)[idx & 31]`` per lane: a 32-entry register table."""
    def codegen(context, builder, sig, args):
        return _lookup(builder, [args[0], args[1]], args[2], 5)
    return f32v(f32v, f32v, i32v), codegen


@intrinsic
def vlut8(typingctx, table, idx):
    """``float(table[idx & 15])`` per lane, where ``table`` holds 16 signed bytes (each
    zero-extended into an int32 lane, as :func:`vload_u8` loads them): one ``pshufb`` looks up
    all 16 lanes, then sign extension and conversion. x86 only (``avx2`` and ``avx512`` hosts
    have SSSE3); ``kernels.linear`` builds such tables only there."""
    def codegen(context, builder, sig, args):
        b16 = ir.VectorType(ir.IntType(8), V)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(b16, [b16, b16]),
                                            "llvm.x86.ssse3.pshuf.b.128")
        k = builder.trunc(builder.and_(args[1], _ivec(15)), b16)
        r = builder.call(fn, [builder.trunc(args[0], b16), k])
        return builder.sitofp(builder.sext(r, _IV), _FV)
    return f32v(i32v, i32v), codegen


@intrinsic
def vflip_sign(typingctx, v, c, bit):
    """-v where bit ``bit`` of c is set (xor of the sign bit)."""
    def codegen(context, builder, sig, args):
        sh = builder.sub(_ivec(31), _splat(builder, _as_i32(builder, args[2]), _IV))
        s = builder.and_(builder.shl(args[1], sh), _ivec(-2 ** 31))
        return builder.bitcast(builder.xor(builder.bitcast(args[0], _IV), s), _FV)
    return f32v(f32v, i32v, bit), codegen


@intrinsic
def vgather(typingctx, table, c):
    """``table[c]`` per lane from a 1-D float32 array (16 scalar loads)."""
    def codegen(context, builder, sig, args):
        a = context.make_array(sig.args[0])(context, builder, args[0])
        v = ir.Constant(_FV, ir.Undefined)
        for i in range(V):
            k = builder.zext(builder.extract_element(args[1], ir.Constant(_I, i)),
                             ir.IntType(64))
            v = builder.insert_element(v, builder.load(builder.gep(a.data, [k])),
                                       ir.Constant(_I, i))
        return v
    return f32v(table, i32v), codegen


# ------------------------------------------------------------- 16-bit lanes (6-bit codes -> bf16)
# A 6-bit code indexes a 64-entry table with one ``vpermi2w`` (32 lanes of 16 bits), and every
# FP6 (and int6) value is exact in bfloat16, i.e. in the top half of a float32: the sign needs
# no separate fix-up and one permute decodes 32 codes. The 512-bit values travel as ``i32v``.
_WV = ir.VectorType(ir.IntType(16), 2 * V)


@intrinsic
def vload_u8w(typingctx, arr, i):
    """32 bytes from byte ``i`` of a uint8 array, zero-extended to 32 16-bit lanes."""
    return i32v(arr, i), _load(ir.VectorType(ir.IntType(8), 2 * V), 1, _WV)


@intrinsic
def vcode6w(typingctx, w, s, k):
    """Per 16-bit lane: 6-bit code of phase ``k`` (0..3) = nibble ``k`` of ``w`` (4 nibbles a
    lane) | crumb ``k`` of ``s`` (4 crumbs in the low byte of a lane) << 4."""
    def codegen(context, builder, sig, args):
        w16, s16 = (builder.bitcast(a, _WV) for a in args[:2])
        k = builder.trunc(args[2], ir.IntType(16)) if args[2].type.width > 16 else args[2]
        undef = ir.Constant(_WV, ir.Undefined)
        kk = builder.shuffle_vector(builder.insert_element(undef, k, ir.Constant(_I, 0)), undef,
                                    ir.Constant(ir.VectorType(_I, 2 * V), [0] * (2 * V)))
        c = lambda v: ir.Constant(_WV, [v] * (2 * V))  # noqa: E731
        nib = builder.and_(builder.lshr(w16, builder.shl(kk, c(2))), c(15))
        crumb = builder.shl(builder.and_(builder.lshr(s16, builder.shl(kk, c(1))), c(3)), c(4))
        return builder.bitcast(builder.or_(nib, crumb), _IV)
    return i32v(i32v, i32v, k), codegen


@intrinsic
def vperm64w(typingctx, lo, hi, idx):
    """``(lo ++ hi)[idx & 63]`` per 16-bit lane: a 64-entry table of 16-bit values in two
    registers: ``vpermi2w`` on the ``avx512`` path, per-lane extracts elsewhere (correct, slow:
    QuantLinear takes the kernel that uses this only on ``avx512``)."""
    def codegen(context, builder, sig, args):
        a, b, k = (builder.bitcast(v, _WV) for v in args)
        if ISA == "avx512":
            fn = cgutils.get_or_insert_function(
                builder.module, ir.FunctionType(_WV, [_WV, _WV, _WV]),
                "llvm.x86.avx512.vpermi2var.hi.512")
            return builder.bitcast(builder.call(fn, [a, k, b]), _IV)
        both = builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I, 4 * V),
                                                        list(range(4 * V))))
        out = ir.Constant(_WV, ir.Undefined)
        for i in range(2 * V):
            j = builder.and_(builder.extract_element(k, ir.Constant(_I, i)),
                             ir.Constant(ir.IntType(16), 63))
            out = builder.insert_element(out, builder.extract_element(both, j),
                                         ir.Constant(_I, i))
        return builder.bitcast(out, _IV)
    return i32v(i32v, i32v, i32v), codegen


@intrinsic
def vbf16_even(typingctx, v):
    """float32 of the bfloat16 in the low half of every 32-bit lane (lanes 0, 2, 4, ...)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.shl(args[0], _ivec(16)), _FV)
    return f32v(i32v), codegen


@intrinsic
def vbf16_odd(typingctx, v):
    """float32 of the bfloat16 in the high half of every 32-bit lane (lanes 1, 3, 5, ...)."""
    def codegen(context, builder, sig, args):
        return builder.bitcast(builder.and_(args[0], _ivec(-65536)), _FV)
    return f32v(i32v), codegen
