"""Quality first at equal deployment cost; solver compute breaks a tie only within noise."""
from __future__ import annotations

import pandas as pd

from advisor.candidates import QUALITY_TIE_NATS, order_by_cost_then_quality


def rows(*cands):
    return pd.DataFrame([dict(spec=s, method=s.split(":")[0], bytes=b, relative_speed=v, pred_dl=q)
                         for s, b, v, q in cands])


def test_equal_cost_candidates_go_by_predicted_quality_not_solver_compute():
    # the demo's case: gptq and quantease at int3 g128 cost the same; quantease is predicted better
    df = rows(("gptq:int3:g128", 1090, 3.0, 0.60), ("quantease:int3:g128", 1090, 3.0, 0.25),
              ("rtn:int4:g128", 1400, 2.5, 0.05), ("rtn:int3:g64", 1000, 3.0, 0.9))
    out = order_by_cost_then_quality(df)
    assert list(out["spec"]) == ["rtn:int3:g64", "quantease:int3:g128", "gptq:int3:g128", "rtn:int4:g128"]
    assert list(out["tie_break"]) == [None, "quality", "quality", None]


def test_compute_breaks_a_tie_only_within_noise():
    df = rows(("quantease:int4:g128", 1400, 2.5, 0.100), ("gptq:int4:g128", 1400, 2.5, 0.100 + QUALITY_TIE_NATS / 2),
              ("awq:int4:g128", 1400, 2.5, 0.2))
    out = order_by_cost_then_quality(df)
    assert list(out["spec"]) == ["gptq:int4:g128", "quantease:int4:g128", "awq:int4:g128"]
    assert list(out["tie_break"]) == ["compute (quality within noise)"] * 2 + ["quality"]


def test_faster_kernels_first_at_equal_bytes_and_cost_order_kept():
    df = rows(("rtn:b", 1000, 2.0, 0.01), ("rtn:a", 1000, 3.0, 0.5), ("rtn:c", 900, 1.0, 0.9))
    assert list(order_by_cost_then_quality(df)["spec"]) == ["rtn:c", "rtn:a", "rtn:b"]
