"""The static FP8 table (runs/fp8.sh): every row of the eval.py --json files given, then per text each
SASQ (or exported --hf) row against the best dynamic FP8 baseline on that text (plain or SmoothQuant-
folded, whichever is lower) and against the best FP8 weights-only row: mean and min / max over seeds.
    python runs/fp8.py fp8-base-a0.5.json fp8-base-a0.8.json fp8-seeds.json"""
import json
import sys

rows, seen = [], set()
for path in sys.argv[1:]:
    for r in json.load(open(path))["rows"]:
        r = {k.rsplit("/", 1)[-1]: v for k, v in r.items()}   # a text by its file name: runs elsewhere agree
        if r["mode"] not in seen:                 # the same baseline in two files: once
            seen.add(r["mode"])
            rows.append(r)
texts = [k for k in rows[0] if k not in ("mode", "wbits", "abits")
         and not k.endswith((" seconds", " windows", "greedy agreement", "greedy prefix"))]
short = [t.rsplit("/", 1)[-1].removesuffix(".txt") for t in texts]
print("| W8A8 FP8 | " + " | ".join(short) + " |\n|---" * 1 + "|---" * len(texts) + "|")
for r in rows:
    print(f"| {r['mode']} | " + " | ".join(f"{r[t]:.3f}" for t in texts) + " |")


def best(pick):
    return {t: min(r[t] for r in rows if pick(r["mode"])) for t in texts}


dynamic = best(lambda m: "FP8" in m and "dynamic per-token" in m and not m.startswith("SASQ"))
w_only = best(lambda m: "FP8" in m and "weights only" in m)
for kind in ("SASQ", "HF"):
    runs = [r for r in rows if r["mode"].startswith(kind)]
    if not runs:
        continue
    print(f"\n{kind} rows ({len(runs)}) per text: mean (min .. max) against the best dynamic FP8, the best "
          "FP8 weights-only")
    print("| text | best dynamic | best weights-only | vs dynamic | vs weights-only |\n|---|---|---|---|---|")
    for t, name in zip(texts, short):
        rel = lambda ref: [100 * (r[t] / ref[t] - 1) for r in runs]  # noqa: E731
        d, w = rel(dynamic), rel(w_only)
        print(f"| {name} | {dynamic[t]:.3f} | {w_only[t]:.3f} | {sum(d) / len(d):+.2f} % ({min(d):+.2f} .. "
              f"{max(d):+.2f}) | {sum(w) / len(w):+.2f} % ({min(w):+.2f} .. {max(w):+.2f}) |")
