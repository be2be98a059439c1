#!/usr/bin/env bash
# The README's GPU measurements in one go, in under 8 minutes on one GPU; installs and downloads nothing.
#
#   benchmarks/gpu.sh                          # on a machine with a GPU: writes outputs/gpu-bench/
#   benchmarks/gpu.sh --device cpu --quick     # the same steps with tiny models and 2 images (a smoke run)
#   benchmarks/gpu.sh --out DIR                # where the JSON files, the cache and the log go
#
# Two runs of benchmarks/throughput.py (random weights, 480x640 images, 7 expressions each):
#   1. stored proposals (200 per image), CLIP ViT-B/16: copatch fp32, copatch bf16, the reference loop;
#   2. Mask2Former Swin-L on the fly, its proposal cache written (background writer): copatch fp32, bf16,
#      the reference loop, and bf16 with Mask2Former's forward under torch.compile (where compiling helps;
#      the CLIP side has a varying number of crops per image and stays eager).
# Each run has its own time limit and writes its JSON after every mode, so a run stopped by its limit keeps
# the modes it finished. Then benchmarks/gpu_table.py prints one table (card, expressions/s, images/s,
# peak GPU memory, speed-up over the reference, whether the picks agree) and writes it to DIR/gpu.json.
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda quick=0 out=outputs/gpu-bench
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --out) out="$2"; shift 2 ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "gpu.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu.sh: --device must be cuda or cpu" >&2; exit 2 ;; esac

if [ -n "${PYTHON:-}" ]; then py="$PYTHON"
elif [ -x .venv/bin/python ]; then py=.venv/bin/python
else py=python3
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1

if [ "$device" = cuda ] && ! "$py" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu.sh: no CUDA device visible to torch; run with --device cpu (--quick) instead" >&2
    exit 2
fi

mkdir -p "$out"
rm -rf "$out/cache" "$out"/stored.json "$out"/mask2former.json "$out"/gpu.json
log="$out/gpu.log"
: > "$log"

if [ "$quick" = 1 ]; then
    common=(--device "$device" --model copatch-tiny --images 2 --expressions 2 --size 40x56 --batch-size 2)
    stored=(--proposals 12)
    m2f=(--m2f tiny --m2f-queries 24 --m2f-min-size 64 --m2f-max-size 96)
    backend=(--compile-backend eager)   # the compile path without code generation: seconds, not minutes
    limits=(240 300)
else
    common=(--device "$device" --model ViT-B-16-quickgelu --size 480x640 --expressions 7 --batch-size 4
            --workers 8 --parse-in-workers)
    stored=(--images 50 --proposals 200)
    m2f=(--images 48 --m2f swin-large)  # 48: every batch has 4 images, one shape to compile
    backend=()
    limits=(190 250)
fi

start=$(date +%s)
run() {  # run NAME LIMIT ARGS...: one throughput.py run under its time limit, output into the log
    local name="$1" limit="$2"; shift 2
    echo "== $name (limit ${limit}s): throughput.py $*" | tee -a "$log"
    timeout --kill-after=10 "$limit" "$py" benchmarks/throughput.py "$@" --json "$out/$name.json" >> "$log" 2>&1
    local rc=$?
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then echo "   $name: stopped at its time limit (kept the finished modes)" | tee -a "$log"
    elif [ $rc -ne 0 ]; then echo "   $name: exited with status $rc (see $log)" | tee -a "$log"
    fi
    return 0
}

run stored "${limits[0]}" "${common[@]}" "${stored[@]}" --bf16
run mask2former "${limits[1]}" "${common[@]}" "${m2f[@]}" --proposer mask2former --bf16 --compile "${backend[@]}" \
    --cache-dir "$out/cache"

rm -rf "$out/cache"  # the entries were written to be timed, not kept
echo
"$py" benchmarks/gpu_table.py "$out/stored.json" "$out/mask2former.json" --json "$out/gpu.json"
status=$?
echo
echo "gpu.sh: $(( $(date +%s) - start )) s in all; table in $out/gpu.json, full output in $log"
exit $status
