"""The kernel-speed calibration plan/recommend rank by: measured here, keyed, cached, reused."""
import json

import pytest

from advisor import kernel_speed
from advisor.candidates import candidate


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("ADVISOR_HOME", str(tmp_path))
    return tmp_path


def _tiny_calibration():
    return kernel_speed.calibrate(specs=("rtn:int4:g128",), shape=(64, 256), repeats=1)


def test_calibration_is_keyed_cached_and_reused(home, monkeypatch):
    table = _tiny_calibration()
    assert table.measured and set(table.speeds) == {"int4"} and table.speeds["int4"] > 0
    key = kernel_speed.cache_key()
    assert {"cpu", "isa", "advisor", "kernels", "torch", "threads"} <= set(key)
    path = kernel_speed.cache_path(key)
    assert str(path) == table.path and path.is_relative_to(home)
    doc = json.loads(path.read_text())
    assert doc["key"] == key and doc["speedup_vs_bf16_batch1"] == table.speeds

    def no_measure(*a, **k):
        raise AssertionError("a cached calibration must be reused, not measured again")

    monkeypatch.setattr(kernel_speed, "measure", no_measure)
    again = kernel_speed.speeds(calibrate_if_missing=True)
    assert again.measured and again.speeds == table.speeds and again.path == table.path
    # another ISA path (or CPU, version, thread count) is another key: not this file
    other = dict(key, isa="portable" if key["isa"] != "portable" else "avx2")
    monkeypatch.setattr(kernel_speed, "cache_key", lambda: other)
    assert kernel_speed.cache_path(other) != path
    assert not kernel_speed.cached().measured
    assert not kernel_speed.speeds(calibrate_if_missing=False).measured


def test_a_stale_file_under_the_same_name_is_not_trusted(home):
    table = _tiny_calibration()
    doc = json.loads(open(table.path).read())
    doc["key"]["torch"] = "0.0"
    open(table.path, "w").write(json.dumps(doc))
    assert not kernel_speed.cached().measured


def test_candidates_label_estimates_and_use_measured_speeds(home, monkeypatch):
    monkeypatch.setenv(kernel_speed.CALIBRATION_ENV, "0")
    from advisor import candidates

    shapes = [(64, 256)]
    est = candidate("rtn:int4:g128", shapes, 0, candidates._kernel_speed_table())
    assert est.speed_source == "estimate"
    assert est.relative_speed == pytest.approx(16 / est.bits_per_weight)
    table = _tiny_calibration()
    got = candidate("rtn:int4:g128", shapes, 0, candidates._kernel_speed_table())
    assert got.speed_source == "measured" and got.relative_speed == table.speeds["int4"]
    assert got.to_dict()["speed_source"] == "measured"
    nf4 = candidate("rtn:nf4:g64", shapes, 0, candidates._kernel_speed_table())
    assert nf4.speed_source == "measured"  # same code width as the measured int4
    assert candidate("rtn:int8", shapes, 0, candidates._kernel_speed_table()).speed_source == \
        "estimate"
