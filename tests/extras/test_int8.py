"""The real INT8 path (CPU torch._int_mm) against the fake-quant graph it implements."""
import os

import pytest
import torch

from extras import int8
import checkpoints
import sasq
from conftest import SP_MODEL

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def static_quant_linear(seed=0, truncate=True):
    torch.manual_seed(seed)
    lin = torch.nn.Linear(64, 40, bias=False)
    act = sasq.ActQuantizer(64, sasq.QuantConfig(), norm_input=truncate)
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


def test_triton_kernel_in_the_interpreter():
    """Our Triton GEMMs (int8.triton_mm: the tiled kernel, and for M <= 16 the split-K decode kernel), run by
    Triton's CPU interpreter, against an exact float64 matmul: ragged M/N, K not a multiple of BLOCK_K (the
    masked loop), with and without the per-row scale."""
    import subprocess
    import sys
    pytest.importorskip("triton", minversion="3.9")     # 3.6's interpreter fails with NumPy 2 (a loop bound)
    code = """
import torch
from extras import int8
torch.manual_seed(0)
for m, k, n in [(5, 384, 48), (33, 256, 70), (1, 512, 64)]:
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws, rs = torch.rand(n) + 0.5, torch.rand(m) + 0.5
    ref = (q.double() @ w.double().T) * ws.double()
    mv = [dict(kernel="mv", BLOCK_N=32, BLOCK_K=128, SPLIT_K=1), dict(kernel="mv", BLOCK_N=64, BLOCK_K=64, SPLIT_K=3),
          dict(kernel="mv", BLOCK_N=16, BLOCK_K=128, SPLIT_K=8)] if m <= 16 else []     # the decode kernel, split-K
    for cfg in [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=256, GROUP_M=2), dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=128, GROUP_M=8)] + mv:
        for r in (None, rs):
            for again in range(2):          # split-K leaves its workspace zeroed for the next call
                out = int8.triton_mm(q, w, ws, r, torch.float32, cfg).double()
                exp = ref if r is None else ref * rs.double()[:, None]
                assert out.shape == (m, n) and ((out - exp).abs() / exp.abs().max()).max() < 1e-6, (m, k, n, cfg)
assert all(int(t.abs().sum()) == 0 for t in int8._SCRATCH[torch.device("cpu")])
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


def test_bench_tiny_runs_on_cpu(tmp_path):
    import json

    from extras import bench
    res = bench.main(["--tiny", "--reps", "2", "--out", str(tmp_path), "--profile",
                      "--tokenizer", str(SP_MODEL)])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"bench-{s}.json" for s in bench.DEFAULT)
    assert [(r["cached tokens"], r["batch"]) for r in res["kv"]["decode"]] == [(48, 1), (48, 2), (96, 1), (96, 2)]
    assert all(isinstance(v, float) and v > 0 for r in res["kv"]["decode"]
               for c, v in r.items() if c.startswith(("bf16", "int8 codes", "fp8 codes")))
    assert len(res["kv"]["decode"][0]) >= 3 + len(bench.CACHES)
    assert "bf16, reference of our kernel (CPU)" in res["kv"]["decode"][0]   # on a CPU: not our kernel
    assert json.load(open(tmp_path / "bench-linear.json"))["device"] == "cpu"
    per_linear = [r for r in res["linear"] if not r["layer"].startswith("gate/up")]
    assert len(per_linear) == 3 * 2 and all(r["static torch"] > 0 and r["bf16"] > 0 for r in per_linear)
    assert len(res["linear"]) == 6 + 2 and all(r["fused SwiGLU + quantize"] > 0 for r in res["linear"][6:])
    logits = res["infer"]["logits"]
    # INT8 and fake-quant compute the same integers: far closer than fake-quant is to bf16
    assert logits[0]["top-1 agree"] > 0.95 and logits[0]["mean |d| / std"] < 0.2 * logits[1]["mean |d| / std"]
    # the fused FFN forms compute what their unfused INT8 models compute (CPU: exactly)
    assert [r["max |d| / std"] for r in logits if "fused vs" in r["compare"] or "merged vs" in r["compare"]] == [0] * 4
    # --profile: one row per variant and input; only the INT8 variants run our GEMM
    prof = res["infer"]["profile prefill"]
    assert [r["variant"] for r in prof] == list(bench.VARIANTS) * 2
    assert all((r["int8 GEMM (ours)"] > 0) == (r["variant"] != "bf16") and r["kernels ms"] > 0 for r in prof)
    mem = res["infer"]["memory"]
    assert 0.5 <= mem[1]["linears GB"] / mem[0]["linears GB"] < 0.6        # int8 codes + fp32 scales
    assert [(r["trains"][:7], r["checkpointing"]) for r in res["train"]] == \
        [("scales ", False)] * 2 + [("scales ", True)] * 2 + [("weights", True)] * 2   # SASQ, then ordinary QAT
    assert all(r["tokens/s"] > 0 and 0 < r["MFU"] for r in res["train"])
    assert res["load"][0]["GB on disk"] > 0


def test_smollm2_int8_logits_equal_fake_quant(smollm):
    """The real model with the committed H100-trained scales: on the CPU in fp32 every integer sum is
    exact in both paths, so the INT8 logits equal the fake-quant logits bit for bit."""
    m, tok = smollm
    x = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. " * 8)])
    checkpoints.load_scales(os.path.join(ROOT, "results", "w8a8-max.safetensors"), m)
    try:
        sasq.freeze(m)
        with torch.no_grad():
            ref = m(x)[0]
            int8.convert(m)
            out = m(x)[0]
        assert sum(isinstance(mod, int8.Int8Linear) for mod in m.modules()) == 7 * m.args.n_layers
        torch.testing.assert_close(out, ref, atol=0, rtol=0)
    finally:
        int8.revert(m)
        sasq.detach(m)
    assert not any(isinstance(mod, (int8.Int8Linear, sasq.QuantLinear)) for mod in m.modules())


def test_fused_gate_up_kernel_in_the_interpreter_equals_torch():
    """The Triton gate/up kernel (SwiGLU + static quantization epilogue) writes the same int8 codes as the
    PyTorch reference of the same arithmetic (fp32 intermediates: the interpreter does not round to bf16
    the way a GPU does; the bf16 path is checked on the GPU by perplexity)."""
    import subprocess
    import sys
    pytest.importorskip("triton", minversion="3.9")     # 3.6's interpreter fails with NumPy 2 (a loop bound)
    code = """
import torch
from extras import int8
torch.manual_seed(0)
for m, k, n in [(5, 256, 48), (33, 128, 70)]:
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8)
    w13 = torch.randint(-127, 128, (2 * n, k), dtype=torch.int8)         # gate and up rows interleaved
    ws13, s2 = (torch.rand(2 * n) + 0.5) * 1e-4, (torch.rand(n) + 0.5) * 5e-3
    ref = int8._torch_gate_up(q, w13, ws13, s2, torch.float32)
    assert 0 < (ref.abs() < 127).float().mean() < 1                # codes inside the range and clamped ones
    mv = [dict(kernel="mv", BLOCK_N=32, BLOCK_K=128, SPLIT_K=1), dict(kernel="mv", BLOCK_N=64, BLOCK_K=64, SPLIT_K=3)]
    for cfg in [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, GROUP_M=2), dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=64, GROUP_M=8)] + \
            (mv if m <= 16 else []):
        out = int8.triton_gate_up(q, w13, ws13, s2, torch.float32, cfg)
        assert out.dtype == torch.int8 and torch.equal(out, ref), (m, k, n, cfg)
print("ok")
"""
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]


@pytest.mark.skipif(not torch.cuda.is_available() or int8.triton is None, reason="needs a CUDA GPU and Triton")
def test_gpu_kernels_in_bf16_match_torch():
    """On a GPU, with the bf16 rounding the interpreter test cannot see: our GEMM equals torch._int_mm plus the
    same scaling exactly, and the fused gate/up kernel's codes equal the PyTorch reference except where Triton's
    exp differs from PyTorch's in the last bit (then by one code, rarely)."""
    torch.manual_seed(0)
    m, k, n = 300, 1024, 1000
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, device="cuda")
    w13 = torch.randint(-127, 128, (2 * n, k), dtype=torch.int8, device="cuda")
    ws13, s2 = (torch.rand(2 * n, device="cuda") + 0.5) * 1e-4, (torch.rand(n, device="cuda") + 0.5) * 3
    torch.testing.assert_close(int8.triton_mm(q, w13, ws13), int8._torch_mm(q, w13, ws13, None, torch.bfloat16),
                               atol=0, rtol=0)
    ref = int8._torch_gate_up(q, w13, ws13, s2, torch.bfloat16)
    d = (int8.triton_gate_up(q, w13, ws13, s2, torch.bfloat16).int() - ref.int()).abs()
    assert 0.3 < (ref.abs() < 127).float().mean() < 1 and d.max() <= 1 and (d > 0).float().mean() < 1e-3
    mv = [dict(kernel="mv", BLOCK_N=64, BLOCK_K=256, SPLIT_K=s, num_stages=4, num_warps=4) for s in (1, 3, 8)]
    for rows in (1, 7, 16):                       # decode sizes: the table's tiles, and the split-K decode kernel
        x, rs = q[:rows].contiguous(), torch.rand(rows, device="cuda") + 0.5
        for cfg in [None] + mv:
            for again in range(2):
                torch.testing.assert_close(int8.triton_mm(x, w13, ws13, rs, config=cfg),
                                           int8._torch_mm(x, w13, ws13, rs, torch.bfloat16), atol=0, rtol=0)
            d = (int8.triton_gate_up(x, w13, ws13, s2, config=cfg).int() -
                 int8._torch_gate_up(x, w13, ws13, s2, torch.bfloat16).int())
            assert d.abs().max() <= 1


def test_fused_ffn_equals_the_unfused_int8_model(tiny_model):
    """fuse() changes where the w2 input is quantized (in the gate/up epilogue), not what it computes."""
    x = torch.randint(0, 64, (2, 24))
    qs = sasq.attach(tiny_model, sasq.QuantConfig())
    sasq.calibrate(tiny_model, qs, torch.randint(0, 64, (4, 24)), progress=False)
    int8.convert(tiny_model)
    ref = tiny_model(x)[0]
    int8.fuse(tiny_model)
    assert isinstance(tiny_model.layers[0].feed_forward, int8.FusedFeedForward)
    torch.testing.assert_close(tiny_model(x)[0], ref, atol=0, rtol=0)
    int8.revert(tiny_model)
    assert isinstance(tiny_model.layers[0].feed_forward.w1, sasq.QuantLinear)
    sasq.detach(tiny_model)
    int8.convert_dynamic(tiny_model)            # the dynamic baseline's merged gate/up GEMM, likewise
    ref = tiny_model(x)[0]
    int8.fuse(tiny_model)
    assert isinstance(tiny_model.layers[0].feed_forward, int8.DynamicFeedForward)
    torch.testing.assert_close(tiny_model(x)[0], ref, atol=0, rtol=0)


def test_compiled_rmsnorm_writes_the_int8_codes(tmp_path):
    """With static scales torch.compile fuses each RMSNorm with the quantization after it: the norm kernel
    itself writes int8 codes (here inductor's C++ code; bench.py --profile reads the Triton code on a GPU)."""
    from extras import bench
    m = bench.build(bench.kern.TINY, "cpu")
    V = bench.variants(m, torch.randint(128, (2, 32)))
    row, = bench.kern.codegen(m, V, str(tmp_path), seq=16, which=("static int8",))
    assert row["norm kernels"] == 2 and row["norm kernels writing int8"] == 2      # attention norm, FFN norm
    assert (tmp_path / "codegen-static-int8.txt").exists()
