"""The peer baseline, run for real: llm-compressor's standard W8A8 recipes on the same model, calibrated
on the same text and windows as SASQ's PTQ initialisation, saved as compressed-tensors folders that
eval.py --hf scores through transformers on the same test windows.

    pip install llmcompressor==0.14.0.1                      # GPU box; it pins compressed-tensors 0.19.0
    python export.py --out smollm2-hf                        # the plain bf16 HF model (GGUF -> HF)
    python peers.py --hf smollm2-hf --out peers              # one folder per recipe below
    python eval.py --test wikitext:wikitext-2-raw-v1:test --test hamlet --hf peers/w8a8-dynamic ...

Recipes (llm-compressor's documented ones; weights int8 per output channel, static, GPTQ not used):
  w8a8-dynamic             scheme "W8A8": int8 activations per token, dynamic (what vLLM runs by default)
  w8a8-static-tensor       int8 activations per tensor, static, min-max observed on the calibration text
  w8a8-static-tensor-sq    the same after SmoothQuantModifier (smoothing strength 0.8, its LLaMA default)
"""
import argparse
import os
import shutil

import torch

import checkpoints
import cli
import data


def recipes():
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.quantization import QuantizationModifier
    from llmcompressor.modifiers.smoothquant import SmoothQuantModifier
    static = QuantizationScheme(
        targets=["Linear"],
        weights=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="channel", dynamic=False),
        input_activations=QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="tensor", dynamic=False))
    w8a8_static = lambda: QuantizationModifier(config_groups={"group_0": static}, ignore=["lm_head"])  # noqa: E731
    return {"w8a8-dynamic": lambda: [QuantizationModifier(targets="Linear", scheme="W8A8", ignore=["lm_head"])],
            "w8a8-static-tensor": lambda: [w8a8_static()],
            "w8a8-static-tensor-sq": lambda: [SmoothQuantModifier(smoothing_strength=0.8), w8a8_static()]}


def run(hf_folder, out, name, wins, device):
    """Quantize a fresh copy of the HF model with one recipe, calibrating on `wins` (n, T); save it."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(hf_folder, dtype=torch.bfloat16).to(device)
    tok = AutoTokenizer.from_pretrained(hf_folder)
    ds = Dataset.from_dict({"input_ids": wins.tolist(), "attention_mask": torch.ones_like(wins).tolist()})
    oneshot(model=m, tokenizer=tok, dataset=ds, recipe=recipes()[name](), max_seq_length=wins.shape[1],
            num_calibration_samples=len(wins), shuffle_calibration_samples=False)
    dest = os.path.join(out, name)
    shutil.rmtree(dest, ignore_errors=True)          # main() checked: absent, or --force
    m.save_pretrained(dest, save_compressed=True)
    tok.save_pretrained(dest)
    return dest


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hf", required=True, help="the plain HF folder (export.py without --scales)")
    p.add_argument("--out", required=True, help="folder for one compressed-tensors folder per recipe")
    p.add_argument("--recipes", default="w8a8-dynamic,w8a8-static-tensor,w8a8-static-tensor-sq",
                   help="comma-separated llm-compressor recipes (default %(default)s)")
    p.add_argument("--calib", default=data.CALIB, help="calibration text, as train.py's")
    p.add_argument("--calib-windows", type=int, default=16, help="as train.py's PTQ initialisation")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per calibration window (default %(default)s)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when a GPU is visible)")
    p.add_argument("--force", action="store_true", help="replace recipe folders that exist under --out")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    a = p.parse_args(argv)
    names = a.recipes.split(",")
    unknown = [n for n in names if n not in ("w8a8-dynamic", "w8a8-static-tensor", "w8a8-static-tensor-sq")]
    if unknown or a.calib_windows < 1:
        p.error(f"unknown recipe(s) {unknown}" if unknown else "--calib-windows must be at least 1")
    import importlib.util
    if importlib.util.find_spec("llmcompressor") is None:       # before loading anything or creating --out
        p.exit(2, f"{p.prog}: error: llmcompressor is not installed (pip install llmcompressor)\n")
    there = [n for n in names if os.path.exists(os.path.join(a.out, n))]
    if there and not a.force:
        p.exit(2, f"{p.prog}: error: {', '.join(os.path.join(a.out, n) for n in there)} exist(s); pass --force "
                  "to replace them\n")
    _, tok = checkpoints.load_model(a.hf)             # our tokenizer: the same calibration windows as train.py
    wins = data.token_windows(tok, a.calib, a.seq_len, a.calib_windows)
    os.makedirs(a.out, exist_ok=True)
    for name in names:
        print(f"wrote {run(a.hf, a.out, name, wins, a.device)}", flush=True)


if __name__ == "__main__":
    cli.run_main(main)
