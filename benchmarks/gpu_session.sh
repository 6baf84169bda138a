#!/usr/bin/env bash
# Everything a lent GPU session has to check and measure, in two calls of under ten minutes each.
#
#   bash benchmarks/gpu_session.sh check        # bf16/fp16 kernel parity, compile, no-sync, training (tests/gpu);
#                                               # attention and fused-layer benchmarks
#   bash benchmarks/gpu_session.sh throughput   # train_throughput at every preset/shape issue 6 names
#
# Logs go to $OUT (default ./gpu_out); each step has its own time limit so one hang cannot eat the
# session; the last lines printed are a summary.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET

step() {  # step NAME SECONDS CMD...
    local name=$1 limit=$2; shift 2
    local t0=$SECONDS
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: rc $rc, $((SECONDS - t0)) s" | tee -a "$OUT/summary.txt"
    tail -n "${TAIL:-25}" "$OUT/$name.log" >> "$OUT/summary.txt"
}

TP="python benchmarks/train_throughput.py --steps 20 --warmup 5"
case "${1:-}" in
check)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/device.txt" 2>&1
    python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" >> "$OUT/device.txt"
    step tests_gpu 240 python -m pytest -q -x -rs tests/gpu
    step attention 200 python -m benchmarks.attention
    step kernels 120 python -m benchmarks.kernels
    ;;
throughput)
    TAIL=12
    step m3_default 120 $TP --preset minimind-3 --batch_size 32 --seq_len 340
    step m3_cudagraphs 150 $TP --preset minimind-3 --batch_size 32 --seq_len 340 --compile_mode reduce-overhead
    step m3_accum8 120 $TP --preset minimind-3 --batch_size 32 --seq_len 340 --accumulation_steps 8 --steps 5 --warmup 2
    step m3_eager 60 $TP --preset minimind-3 --batch_size 32 --seq_len 340 --compile 0
    step m3_torch_eager 60 $TP --preset minimind-3 --batch_size 32 --seq_len 340 --backend torch --compile 0
    step m3_torch_compiled 120 $TP --preset minimind-3 --batch_size 32 --seq_len 340 --backend torch --compile 1
    step small_512 60 $TP --preset minimind2-small --batch_size 32 --seq_len 512
    step small_1024 60 $TP --preset minimind2-small --batch_size 16 --seq_len 1024
    step mm2_512 60 $TP --preset minimind2 --batch_size 32 --seq_len 512
    step mm2_1024 60 $TP --preset minimind2 --batch_size 16 --seq_len 1024
    step moe_512 90 $TP --preset minimind2-moe --batch_size 16 --seq_len 512
    ;;
*)
    echo "usage: bash benchmarks/gpu_session.sh check|throughput" >&2; exit 2 ;;
esac
cat "$OUT/summary.txt"
