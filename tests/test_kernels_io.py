"""Save/load round trip (safetensors) and GPTQ checkpoint export read back by its formula."""
import json
import warnings

import pytest
import torch

from advisor import kernels
from advisor.kernels.gptq_format import gptq_tensors

warnings.filterwarnings("ignore", module="numba")


def _int_layer(bits, out=64, inn=256, group=128, sym=False, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 2 ** bits, (out, inn), generator=g)
    scales = (torch.rand(out, inn // group, generator=g) * 0.02 + 0.001).half().float()
    if sym:  # table -8..7, no offsets -> zero point 8
        table, offsets = torch.arange(2.0 ** bits) - 2 ** (bits - 1), None
    else:  # table 0..15, offset = -scale * zero, zero integer in [1, 2**bits]
        table = torch.arange(2.0 ** bits)
        zero = torch.randint(1, 2 ** bits + 1, scales.shape, generator=g).float()
        offsets = -scales * zero
    return kernels.pack_linear(codes, scales, offsets, bits=bits, table=table, group_size=group,
                               bias=torch.randn(out, generator=g) if bias else None)


def test_save_load_roundtrip(tmp_path):
    from advisor.kernels.codebook import exmy_grid

    a = _int_layer(4)
    b = kernels.pack_linear(torch.randint(0, 64, (8, 40)), torch.rand(8, 1), None, bits=6,
                            table=torch.tensor(exmy_grid(3, 2)).float(), group_size=40,
                            meta={"dtype": "fp6_e3m2"})
    meta = {"spec": "rtn:int4:g128", "provenance": {"seed": 0}}
    path = tmp_path / "m.safetensors"
    kernels.save_quantized(str(path), {"layers.0.up": a, "layers.0.fp6": b}, meta)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]
    mods, meta2 = kernels.load_quantized(str(path))
    assert meta2 == meta and set(mods) == {"layers.0.up", "layers.0.fp6"}
    for name, orig in (("layers.0.up", a), ("layers.0.fp6", b)):
        for k, v in orig.state_dict().items():
            assert torch.equal(mods[name].state_dict()[k], v), k
        assert torch.equal(mods[name]._dequantize_torch(), orig._dequantize_torch())
    assert mods["layers.0.fp6"].meta == {"dtype": "fp6_e3m2"}


@pytest.mark.parametrize("bits,sym", [(4, False), (4, True), (8, True), (8, False)])
def test_gptq_export_reads_back(tmp_path, bits, sym):
    mod = _int_layer(bits, sym=sym)
    kernels.export_gptq(str(tmp_path), {"model.layers.0.mlp.up_proj": mod})
    cfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert cfg["bits"] == bits and cfg["group_size"] == 128 and cfg["checkpoint_format"] == "gptq"
    t = gptq_tensors(mod)
    p = 32 // bits
    assert t["qweight"].dtype == torch.int32 and t["qweight"].shape == (256 // p, 64)
    assert t["qzeros"].dtype == torch.int32 and t["qzeros"].shape == (2, 64 // p)
    assert t["scales"].dtype == torch.float16 and t["scales"].shape == (2, 64)
    assert torch.equal(t["g_idx"], torch.arange(256, dtype=torch.int32) // 128)
    W = kernels.read_gptq(str(tmp_path))["model.layers.0.mlp.up_proj"]
    ours = mod._dequantize_torch()
    # equal up to fp16 rounding of the stored offset (ours) vs the integer zero point (GPTQ)
    tol = 2e-3 * mod.group_scales().max().item() * 2 ** bits
    assert (W - ours).abs().max().item() <= tol
    if sym:
        zeros = t["qzeros"].view(torch.uint8) if bits == 8 else None
        if zeros is not None:
            assert (zeros == 127).all()  # v1 stores zero - 1 = 128 - 1


def test_gptq_export_rejects_non_integer_formats(tmp_path):
    from advisor.kernels.codebook import exmy_grid

    fp = kernels.pack_linear(torch.randint(0, 16, (8, 128)), torch.rand(8, 1), None, bits=4,
                             table=torch.tensor(exmy_grid(2, 1)).float(), group_size=128)
    with pytest.raises(ValueError):
        kernels.export_gptq(str(tmp_path), {"l": fp})
