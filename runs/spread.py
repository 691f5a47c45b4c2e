"""Per text, the SASQ rows of an eval.py --json against its dynamic W8A8 row: each run, then the mean
and min / max of the relative difference (one run is one draw).   python runs/spread.py seeds.json"""
import json
import sys

rows = json.load(open(sys.argv[1]))["rows"]
texts = [k for k in rows[0] if k not in ("mode", "wbits", "abits")
         and not k.endswith((" seconds", " windows", "greedy agreement", "greedy prefix"))]
dyn = next(r for r in rows if r["mode"].startswith("W8A8 dynamic"))
sasq = [r for r in rows if r["mode"].startswith("SASQ")]
print("| text | dynamic | " + " | ".join(r["mode"].rsplit("[", 1)[-1].rstrip("]") for r in sasq)
      + " | vs dynamic: mean (min .. max) |")
print("|---" * (3 + len(sasq)) + "|")
for t in texts:
    rel = [100 * (r[t] / dyn[t] - 1) for r in sasq]
    print(f"| {t.rsplit('/', 1)[-1]} | {dyn[t]:.3f} | " + " | ".join(f"{r[t]:.3f}" for r in sasq)
          + f" | {sum(rel) / len(rel):+.1f} % ({min(rel):+.1f} .. {max(rel):+.1f}) |")
