"""Perplexity of an exported folder through vLLM's CPU build, run in vLLM's own environment:

    .venv-vllm/bin/python tests/vllm_reader.py FOLDER WINDOWS.json [--static] > result.json

WINDOWS.json holds token windows (a list of lists). vLLM scores each as a prompt (prompt logprobs, one
generated token) and we sum the logprob of every actual token after the first. It also reports which
int8 kernel each quantized linear runs and which online transforms it applies, read from the engine's own
modules. On a CPU with AMX, vLLM 0.32 runs int8 layers through `int8_scaled_mm_with_quant`, which takes no
input scale and quantizes per token; `--static` hides AMX from vLLM's kernel choice so that it takes its
oneDNN path, which quantizes with the checkpoint's static input_scale. vLLM 0.32's CPU build cannot run
an online transform (a rotated export's down_proj Hadamard): its dense fallback calls `layer.cpu_linear`,
which nothing sets on a HadamardTransform (AttributeError). `--patch-transform` gives the transform that
one missing attribute (a plain F.linear), to measure what vLLM's transform code computes once it runs.
"""
import json
import math
import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"      # the engine in this process: the patch below applies
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")


def engine_report(model):
    """(kernel path -> count of linears, online transform modules) of a loaded vLLM model."""
    paths, transforms = {}, 0
    for name, mod in model.named_modules():
        method = getattr(mod, "quant_method", None)
        inner = getattr(method, "quant_method", method)              # a transform method wraps the quant method
        kernel = getattr(getattr(getattr(mod, "scheme", None), "kernel", None), "linear_method", None)
        if kernel is not None and inner is not None:
            key = f"{type(mod.scheme).__name__}:{kernel.__name__}"
            paths[key] = paths.get(key, 0) + 1
        if type(method).__name__ == "CompressedTensorsLinearTransformMethod":
            transforms += 1
    return paths, transforms


def main():
    folder, windows_path = sys.argv[1], sys.argv[2]
    static = "--static" in sys.argv[3:]
    import torch
    if static:
        torch.cpu._is_amx_tile_supported = lambda: False
    if "--patch-transform" in sys.argv[3:]:
        from vllm.model_executor.layers.quantization.compressed_tensors.transform.module import HadamardTransform
        HadamardTransform.cpu_linear = lambda self, x, w, b: torch.nn.functional.linear(x, w, b)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt
    wins = json.load(open(windows_path))
    llm = LLM(model=folder, dtype="float32" if static else "bfloat16", max_model_len=len(wins[0]) + 1,
              enforce_eager=True, max_num_seqs=4, seed=0)
    paths, transforms = llm.apply_model(engine_report)[0]
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in wins],
                        SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)
    nll, count = 0.0, 0
    for w, o in zip(wins, outs):
        for tok, lp in zip(w[1:], o.prompt_logprobs[1:]):
            nll -= lp[tok].logprob
            count += 1
    print(json.dumps({"ppl": math.exp(nll / count), "tokens": count, "kernels": paths, "transforms": transforms,
                      "quant": type(llm.llm_engine.vllm_config.quant_config).__name__}))


if __name__ == "__main__":
    main()
