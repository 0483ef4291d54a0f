"""QuantSpec: canonical string form, validation messages, bits per weight."""
from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

import advisor.quantizers as q
from advisor.quantizers import QuantSpec

EXAMPLES = [
    "rtn:int4", "gptq:int4:g128", "gptq:int3:g128:asym", "quantease-outlier:int3:g128", "rtn:mxfp4",
    "gptq:int4:g128:act", "gptq:int3:g64:asym:act:damp0.05", "quantease:int3:g128:it10:winit:act",
    "quantease-outlier:int3:o0.02:it5", "awq:int4:g128:gptq", "nonuniform:nf4:g64:it10", "rtn:fp6_e3m2",
    "rtn:fp8_e4m3:g32", "awq:mxint4", "rtn:int8:asym",
]


@pytest.mark.parametrize("text", EXAMPLES)
def test_examples_round_trip(text):
    spec = QuantSpec.parse(text)
    assert str(spec) == text
    assert QuantSpec.parse(str(spec)) == spec
    assert hash(spec) == hash(QuantSpec.parse(text))


def test_fields():
    s = QuantSpec.parse("gptq:int3:g128:asym:act")
    assert (s.method, s.dtype, s.group_size, s.symmetric) == ("gptq", "int3", 128, False)
    assert s.option("act") is True and s.option("damp") == 0.01
    assert QuantSpec("gptq", "int3", 128, False, {"act": True}) == s
    assert s.with_options(act=False) == QuantSpec("gptq", "int3", 128, False)


@st.composite
def specs(draw):
    method = q.get_method(draw(st.sampled_from(q.known_methods())))
    names = sorted(n for n, d in q.DTYPES.items() if d.family in method.dtype_families)
    dt = q.get_dtype(draw(st.sampled_from(names)))
    group = None if dt.block_size else draw(st.one_of(st.none(), st.integers(1, 8192)))
    sym = True
    if dt.supports_asymmetric and method.supports_asymmetric:
        sym = draw(st.booleans())
    options = {}
    for opt in method.options:
        if not draw(st.booleans()):
            continue
        if opt.kind is bool:
            options[opt.name] = draw(st.booleans())
        elif opt.kind is int:
            options[opt.name] = draw(st.integers(1, int(opt.max_value or 10**6)))
        else:
            options[opt.name] = draw(st.floats(1e-6, opt.max_value or 1e6, allow_nan=False))
    if dt.block_size and options.get("act") and method.name == "gptq":
        options["act"] = False
    return QuantSpec(method.name, dt.name, group, sym, options)


@settings(max_examples=300, deadline=None)
@given(specs())
def test_parse_str_inverse_property(spec):
    text = str(spec)
    assert QuantSpec.parse(text) == spec
    assert str(QuantSpec.parse(text)) == text


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(["rtn", "gptq", "quantease", "int4", "int3", "mxfp4", "g128", "g0", "g064",
                                 "asym", "sym", "act", "it30", "it5", "o0.01", "o0.010", "damp0.02", "gptq",
                                 "nf4", "x"]), min_size=1, max_size=6))
def test_any_string_parses_exactly_or_raises_value_error(tokens):
    text = ":".join(tokens)
    try:
        spec = QuantSpec.parse(text)
    except ValueError:
        return
    assert str(spec) == text


def test_unknown_method_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        QuantSpec.parse("gtpq:int4:g128")
    msg = str(e.value)
    assert "did you mean gptq" in msg
    for name in q.known_methods():
        assert name in msg


def test_unknown_dtype_names_the_valid_ones():
    with pytest.raises(ValueError) as e:
        QuantSpec.parse("gptq:int5:g128")
    for name in q.DTYPES:
        assert name in str(e.value)


def test_unknown_option_names_the_valid_ones():
    with pytest.raises(ValueError, match=r"act .*damp<float>"):
        QuantSpec.parse("gptq:int4:g128:fast")
    with pytest.raises(ValueError, match="unknown option 'fast' for method gptq; valid options: act"):
        QuantSpec("gptq", "int4", 128, True, {"fast": True})


@pytest.mark.parametrize("text,match", [
    ("rtn:mxfp4:g64", "fixed block of 32"),
    ("rtn:mxfp4:g32", "fixed block of 32"),
    ("rtn:fp4_e2m1:asym", "only to integer types"),
    ("rtn:mxint4:asym", "only to integer types"),
    ("nonuniform:int4:asym", "does not take 'asym'"),
    ("nonuniform:fp4_e2m1", "supported families: int, nf"),
    ("gptq:int4:asym:g128", "write it as 'gptq:int4:g128:asym'"),
    ("quantease:int3:g128:it30", "write it as 'quantease:int3:g128'"),
    ("quantease-outlier:int3:o0.020", "write it as 'quantease-outlier:int3:o0.02'"),
    ("gptq:int4:sym", "omit 'sym'"),
    ("gptq:int4:g0", "positive int"),
    ("gptq:int4:g064", "write the group as 'g64'"),
    ("gptq:int4:g128:g64", "given twice"),
    ("quantease-outlier:int3:o0.9", "<= 0.5"),
    ("gptq", "at least '<method>:<dtype>'"),
    ("", "empty spec"),
])
def test_invalid_specs_explain(text, match):
    with pytest.raises(ValueError, match=match):
        QuantSpec.parse(text)


def test_gptq_act_order_refused_for_mx():
    with pytest.raises(ValueError, match="act-order"):
        QuantSpec.parse("gptq:mxfp4:act")


@pytest.mark.parametrize("text,n,expect", [
    ("rtn:int4:g128", 4096, 4 + 16 / 128),
    ("gptq:int3:g128:asym", 4096, 3 + 16 / 128 + 3 / 128),
    ("rtn:int4", 4096, 4 + 16 / 4096),
    ("rtn:int4:g128", 576, 4 + 16 * 5 / 576),  # last partial group counted
    ("rtn:int8:g64:asym", 100, 8 + (16 + 8) * 2 / 100),
    ("rtn:mxfp4", 4096, 4 + 8 / 32),
    ("rtn:mxint8", 4096, 8.25),
    ("rtn:mxfp6_e3m2", 576, 6 + 8 * 18 / 576),
    ("rtn:fp6_e3m2", 4096, 6 + 16 / 4096),
    ("quantease-outlier:int3:g128", 4096, 3 + 16 / 128 + 48 * 0.01),
    ("quantease-outlier:int3:g128:o0.02", 4096, 3 + 16 / 128 + 48 * 0.02),
    ("nonuniform:int4:g128", 4096, 4 + 16 / 128 + 16 * 16 / 4096),
    ("nonuniform:nf3", 1024, 3 + 16 / 1024 + 16 * 8 / 1024),
    ("awq:int4:g128", 4096, 4 + 16 / 128),
])
def test_bits_per_weight(text, n, expect):
    assert QuantSpec.parse(text).bits_per_weight(n) == pytest.approx(expect, rel=1e-12)


def test_bits_per_weight_without_in_features():
    assert QuantSpec.parse("gptq:int4:g128").bits_per_weight() == 4.125
    assert QuantSpec.parse("rtn:mxfp4").bits_per_weight() == 4.25
    with pytest.raises(ValueError, match="pass in_features"):
        QuantSpec.parse("rtn:int4").bits_per_weight()
    with pytest.raises(ValueError, match="pass in_features"):
        QuantSpec.parse("nonuniform:int4:g128").bits_per_weight()
