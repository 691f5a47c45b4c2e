# The CPU KV-cache measurement of docs/kvcache.md; run from the project root: bash results/kvcpu/run.sh
. .venv/bin/activate
W=../shared/data/wikitext; C="--calib $W:wikitext-2-v1:validation"; S="--steps 20 --seq-len 256 --batch-size 2 --calib-windows 8 --checkpointing"
for spec in "kv8fp8 --kv-bits 8 --kv-format fp8" "kv8 --kv-bits 8" "kv4 --kv-bits 4"; do
  set -- $spec; n=$1; shift
  /usr/bin/time -f "$n train %e s" -a -o results/kvcpu/times.txt python train.py --deployable $C $S "$@" --out results/kvcpu/$n.safetensors --force > results/kvcpu/$n.log 2>&1
done
for n in kv8fp8 kv8 kv4; do
  /usr/bin/time -f "$n eval %e s" -a -o results/kvcpu/times.txt python eval.py --test $W:wikitext-2-raw-v1:test --test ood --limit 8 --seq-len 512 $C --calib-seq-len 256 --calib-windows 8 --scales results/kvcpu/$n.safetensors --kv-baselines --json results/kvcpu/eval-$n.json --force > results/kvcpu/eval-$n.log 2>&1
done
echo DONE >> results/kvcpu/times.txt
