"""Perplexity of exported folders through vLLM's CPU build, run in vLLM's own environment:

    .venv-vllm/bin/python tests/extras/vllm_reader.py WINDOWS.json FOLDER:PATH ... > results.json

WINDOWS.json holds token windows (a list of lists). vLLM scores each as a prompt (prompt logprobs, one
generated token) and we sum the logprob of every actual token after the first. For each job we also read,
from the engine's own modules, which int8 kernel each quantized linear runs. A job is FOLDER:PATH, PATH one of
  default  vLLM as a user starts it (bf16; float32 on a CPU without AVX-512-BF16 or AMX, where vLLM's bf16
           is emulated and scoring two windows took over 5 minutes). On a CPU with AMX, vLLM 0.32 runs int8
           layers through `int8_scaled_mm_with_quant` (`_apply_weights_sgl`), which takes no input scale and
           quantizes each token at run time: a static checkpoint runs as a dynamic one.
  static   AMX hidden from vLLM's kernel choice (float32), so that it takes its oneDNN path
           (`_apply_weights_onednn`), which quantizes with the checkpoint's static input_scale.
  fp8kv    static, with kv_cache_dtype="fp8": vLLM stores the cache in FP8-e4m3 and takes the
           checkpoint's k_scale / v_scale (compressed-tensors' kv_cache_scheme) for it.
           vLLM 0.32 refuses an FP8 cache on a CPU without AVX-512 or AMX (an AVX2-only AMD EPYC here).
The report also gives the k_scale / v_scale vLLM's first attention layer holds.
A job that fails reports its error instead; each job's line is printed as it ends.
"""
import json
import math
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the engine in this process: the patches apply
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


def cpu_flags():
    """The x86 feature flags of this CPU (empty where /proc/cpuinfo is absent)."""
    try:
        return set(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split(":")[1].split())
    except (OSError, StopIteration):
        return set()


def engine_report(model):
    """({scheme:kernel: number of linears}, the first attention layer's KV-cache dtype and scales)."""
    kernels, kv = {}, None
    for mod in model.modules():
        if kv is None and hasattr(mod, "_k_scale") and hasattr(mod, "kv_cache_dtype"):
            kv = {"kv_cache_dtype": mod.kv_cache_dtype, "k_scale": float(mod._k_scale), "v_scale": float(mod._v_scale)}
        kernel = getattr(getattr(getattr(mod, "scheme", None), "kernel", None), "linear_method", None)
        if kernel is not None:
            key = f"{type(mod.scheme).__name__}:{kernel.__name__}"
            kernels[key] = kernels.get(key, 0) + 1
    return kernels, kv


def run(folder, path, wins):
    import torch
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    amx = torch.cpu._is_amx_tile_supported
    if path in ("static", "fp8kv"):
        torch.cpu._is_amx_tile_supported = lambda: False
    try:
        bf16 = path == "default" and bool({"avx512_bf16", "amx_bf16"} & cpu_flags())
        llm = LLM(model=folder, dtype="bfloat16" if bf16 else "float32", seed=0,
                  max_model_len=len(wins[0]) + 1, enforce_eager=True, max_num_seqs=len(wins),
                  **({"kv_cache_dtype": "fp8"} if path == "fp8kv" else {}))
        kernels, kv = llm.apply_model(engine_report)[0]
        outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in wins],
                            SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
        nll = -sum(lp[t].logprob for w, o in zip(wins, outs) for t, lp in zip(w[1:], o.prompt_logprobs[1:]))
        count = sum(len(w) - 1 for w in wins)
        del llm
        return {"ppl": math.exp(nll / count), "tokens": count, "kernels": kernels, "kv": kv,
                "dtype": "bfloat16" if bf16 else "float32"}
    except Exception as e:       # report and go on: the next job gets a fresh engine
        return {"error": f"{type(e).__name__}: {e}"[:300]}
    finally:
        torch.cpu._is_amx_tile_supported = amx


def main():
    wins = json.load(open(sys.argv[1]))
    for job in sys.argv[2:]:           # one line per job as it ends: a job that kills the process keeps the rest
        print("RESULT " + json.dumps({job: run(*job.rsplit(":", 1), wins)}), flush=True)


if __name__ == "__main__":
    main()
