"""The real INT8 path (CPU torch._int_mm) against the fake-quant graph it implements."""
import torch

import int8
import sasq


def static_quant_linear(seed=0, truncate=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 40, bias=False)
    act = sasq.ActQuantizer(64, sasq.QuantConfig(), truncate=truncate)
    with torch.no_grad():
        act.log_scale.copy_((torch.rand(64) * 0.03 + 0.005).log())
        if act.log_c is not None:
            act.log_c.copy_((torch.rand(64) * 2 + 1).log())
    return sasq.QuantLinear(lin, act, wbits=8)


def test_int8_linear_equals_fake_quant():
    for truncate in (True, False):
        ql = static_quant_linear(truncate=truncate)
        x = torch.randn(3, 20, 64) * 2
        with torch.no_grad():
            ref = ql(x)
            out = int8.Int8Linear(ql)(x)
        assert int8.Int8Linear(ql).weight.dtype == torch.int8
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_dynamic_int8_equals_dynamic_fake_quant():
    ql = static_quant_linear()
    dyn = sasq.QuantLinear(ql.linear, sasq.ActQuantizer(64, sasq.QuantConfig(act="dynamic"), True), 8)
    x = torch.randn(4, 64)
    with torch.no_grad():
        torch.testing.assert_close(int8.DynamicInt8Linear(ql.linear)(x), dyn(x), atol=1e-5, rtol=1e-5)


def test_converted_model_matches_its_fake_quant_twin(tiny_model):
    x = torch.randint(0, 64, (2, 24))
    qs = sasq.attach(tiny_model, sasq.QuantConfig())
    sasq.calibrate(tiny_model, qs, torch.randint(0, 64, (4, 24)), progress=False)
    with torch.no_grad():
        qs[0]["attn"].log_c.sub_(2.0)        # make the truncation bite, so it is exercised
        ref = tiny_model(x)[0]
        int8.convert(tiny_model)
        out = tiny_model(x)[0]
    assert sum(isinstance(m, int8.Int8Linear) for m in tiny_model.modules()) == 2 * 7
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


def test_bench_tiny_runs_on_cpu(tmp_path):
    import json

    import bench
    rows = bench.main(["--tiny", "--reps", "2", "--out", str(tmp_path)])
    assert len(rows) == 3 * 2 and all(r["static_ms"] > 0 and r["bf16_ms"] > 0 for r in rows)
    assert json.load(open(tmp_path / "bench.json"))["device"] == "cpu"
    assert all(r["weight_bytes_int8"] * 2 == r["weight_bytes_bf16"] for r in rows)
