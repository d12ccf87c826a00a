#!/usr/bin/env bash
# One table, one run, this machine: the LoRA training step of lora (C++) against
# PEFT's formula on PyTorch, each beside its own floor (the two frozen GEMMs) and
# full fine-tuning of the same layer, plus peak memory.
#
#   bench/compare.sh                      # d = 4096, N = 2048, r = 16, all cores
#   D=1024 N=512 R=8 THREADS=1 ROUNDS=5 bench/compare.sh
#
# Environment (all optional):
#   BUILD_DIR  build directory; configured and built here if needed (default build-bench)
#   D N R      layer width (d_in = d_out), tokens, LoRA rank          (4096 2048 16)
#   DROPOUT    lora_dropout for both sides: 0 (PEFT's default) or 0.1 (r = 16 only)   (0)
#   THREADS    threads for both sides: OMP_NUM_THREADS, OPENBLAS_NUM_THREADS and
#              torch.set_num_threads                                    (nproc)
#   ROUNDS     rounds; in each, every mode runs ours then PyTorch, the order
#              reversed every other round, so slow phases of the machine hit both (3)
#   STEPS      timed steps per mode, side and round, after one untimed step (3)
#   OUT        folder for the table (compare.md), the raw lines and summary.dat (for plot.sh)
#              (bench/results)
#   PYTHON     a python3 with torch                                     (/usr/bin/python3)
# "median" is over every timed step of every round; "spread" is the lowest and
# highest per-round median; "best" the fastest step. Other processes on the
# machine slow either side at random: run it on an idle machine, and read the
# load averages it prints.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BUILD_DIR="${BUILD_DIR:-$ROOT/build-bench}"
D="${D:-4096}" N="${N:-2048}" R="${R:-16}" DROPOUT="${DROPOUT:-0}"
THREADS="${THREADS:-$(nproc)}" ROUNDS="${ROUNDS:-3}" STEPS="${STEPS:-3}"
OUT="${OUT:-$ROOT/bench/results}"
PYTHON="${PYTHON:-/usr/bin/python3}"

# bench_linear's LoRA step runs without dropout (BM_LoraStep) or with p = 0.1 (BM_LoraStepDropout, r = 16).
case "$DROPOUT" in
  0 | 0.0) LORA_BM=BM_LoraStep ;;
  0.1) LORA_BM=BM_LoraStepDropout ;;
  *) echo "compare.sh: DROPOUT must be 0 or 0.1 (the rates bench_linear measures)" >&2; exit 2 ;;
esac

openblas_env="$(env | grep '^OPENBLAS' | tr '\n' ' ' || true)"  # as found, before we set the thread count
export OMP_NUM_THREADS="$THREADS" OPENBLAS_NUM_THREADS="$THREADS"

if [[ ! -x "$BUILD_DIR/bench/bench_linear" || ! -x "$BUILD_DIR/bench/bench_memory" ]]; then
  cmake -S "$ROOT" -B "$BUILD_DIR" -DCMAKE_BUILD_TYPE=Release -DLORA_ENABLE_CUDA=OFF -DLORA_BUILD_TESTS=OFF \
    -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=ON >/dev/null
fi
cmake --build "$BUILD_DIR" -j2 --target bench_linear bench_memory >/dev/null

mkdir -p "$OUT"
RAW="$OUT/compare-raw.txt"
: >"$RAW"

{
  echo "date=$(date -u +%Y-%m-%dT%H:%MZ)"
  echo "cpu=$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
  echo "cores=$(nproc) threads=$THREADS"
  echo "openblas_env=${openblas_env:-none}"
  echo "torch=$("$PYTHON" -c 'import torch; print(torch.__version__)')"
  echo "shape d=$D n=$N r=$R dropout=$DROPOUT rounds=$ROUNDS steps=$STEPS"
  echo "load_before=$(cut -d' ' -f1-3 /proc/loadavg)"
} | tee -a "$RAW"
if awk -v l="$(cut -d' ' -f1 /proc/loadavg)" -v c="$(nproc)" 'BEGIN { exit !(l > 0.25 * c) }'; then
  echo "warning: load average $(cut -d' ' -f1 /proc/loadavg) on $(nproc) cores: other processes will disturb the timings" >&2
fi

bench_name() {  # the bench_linear benchmark of one mode
  case "$1" in
    floor) echo "BM_FrozenGemms/d:$D/N:$N" ;;
    lora) echo "$LORA_BM/d:$D/N:$N/r:$R" ;;
    full) echo "BM_FullFineTune/d:$D/N:$N" ;;
  esac
}

ours() {  # ours MODE ROUND: one line per repetition (one step at large sizes, a mean of several at small)
  local json="$OUT/.bench_linear.json"
  "$BUILD_DIR/bench/bench_linear" --benchmark_filter="^$(bench_name "$1")/real_time\$" \
    --benchmark_repetitions="$STEPS" --benchmark_out="$json" --benchmark_out_format=json >/dev/null 2>&1
  "$PYTHON" - "$json" "$1" "$2" <<'EOF' >>"$RAW"
import json, sys
runs = [b for b in json.load(open(sys.argv[1]))["benchmarks"] if b.get("run_type") == "iteration"]
assert runs, "bench_linear ran no benchmark: check D, N, R against its argument grid"
for b in runs:
    assert b["time_unit"] == "ms"
    print(f"side=ours mode={sys.argv[2]} round={sys.argv[3]} ms={b['real_time']:.3f}")
EOF
  rm -f "$json"
}

peer() {  # peer MODE ROUND
  "$PYTHON" "$ROOT/bench/peer_pytorch.py" --mode "$1" --d "$D" --n "$N" --r "$R" --dropout "$DROPOUT" \
    --threads "$THREADS" --steps "$STEPS" |
    sed -n "s/^peer=pytorch mode=\([a-z]*\) .* step=[0-9]* ms=\([0-9.]*\)$/side=pytorch mode=\1 round=$2 ms=\2/p" >>"$RAW"
}

for ((round = 1; round <= ROUNDS; round++)); do
  echo "round $round/$ROUNDS (load $(cut -d' ' -f1 /proc/loadavg)) ..." >&2
  for mode in floor lora full; do
    if ((round % 2)); then ours $mode $round; peer $mode $round; else peer $mode $round; ours $mode $round; fi
  done
done

# Peak memory: a process per mode and side that runs 10 training steps.
for mode in lora full; do
  "$BUILD_DIR/bench/bench_memory" --mode "$mode" --d "$D" --n "$N" --r "$R" --steps 10 --dropout "$DROPOUT" |
    sed -n "s/^lib=lora mode=\([a-z]*\) .* trainable=\([0-9]*\) .* optimizer_bytes=\([0-9]*\) .*/side=ours mode=\1 trainable=\2 optimizer_bytes=\3/p;
            s/^lib=lora mode=\([a-z]*\) .* peak_rss_kb=\([0-9]*\) base_rss_kb=\([0-9]*\)$/side=ours mode=\1 peak_rss_kb=\2 base_rss_kb=\3/p" >>"$RAW"
  "$PYTHON" "$ROOT/bench/peer_pytorch.py" --mode "$mode" --d "$D" --n "$N" --r "$R" --dropout "$DROPOUT" \
    --threads "$THREADS" --steps 9 --warmup 1 | tail -n 1 |
    sed -n "s/^peer=pytorch mode=\([a-z]*\) .* peak_rss_kb=\([0-9]*\) base_rss_kb=\([0-9]*\).*/side=pytorch mode=\1 peak_rss_kb=\2 base_rss_kb=\3/p" >>"$RAW"
done
echo "load_after=$(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$RAW"

"$PYTHON" - "$RAW" "$OUT/summary.dat" "$D" "$N" "$R" <<'EOF' | tee "$OUT/compare.md"
import re, statistics, sys
raw, dat, d, n, r = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
times, rss, opt, header = {}, {}, {}, []
for line in open(raw):
    kv = dict(re.findall(r"(\w+)=(\S+)", line))
    if "side" not in kv:
        header.append(line.rstrip())
    elif "ms" in kv:
        times.setdefault((kv["side"], kv["mode"]), []).append((int(kv["round"]), float(kv["ms"])))
    elif "peak_rss_kb" in kv:
        rss[(kv["side"], kv["mode"])] = (int(kv["peak_rss_kb"]), int(kv["base_rss_kb"]))
    elif "optimizer_bytes" in kv:
        opt[kv["mode"]] = (int(kv["trainable"]), int(kv["optimizer_bytes"]))

# FLOPs of the GEMMs (2 m n k): floor 2 of N x d x d, full 3, LoRA the floor + 6 skinny ones of N x d x r.
gemm = 2.0 * n * d * d
flops = {"floor": 2 * gemm, "lora": 2 * gemm + 6 * 2.0 * n * d * r, "full": 3 * gemm}
med = {k: statistics.median(t for _, t in v) for k, v in times.items()}
best = {k: min(t for _, t in v) for k, v in times.items()}
def spread(k):
    per_round = [statistics.median(t for rd, t in times[k] if rd == x) for x in sorted({rd for rd, _ in times[k]})]
    return f"{min(per_round):.0f}-{max(per_round):.0f}"
mib = lambda kb: kb / 1024.0

print()
print(f"d_in = d_out = {d}, N = {n} tokens, r = {r}, float32; {len(times[('ours', 'lora')])} timed steps per row")
print()
print("| side | step | median ms | spread (round medians) | best ms | GFLOP/s (median) | ours / PyTorch | / own floor | LoRA / own full FT | peak RSS MiB | peak RSS - start MiB |")
print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
labels = {"lora": "LoRA step (fwd + bwd + AdamW)", "full": "full fine-tuning step", "floor": "floor: x W^T and dL/dy W"}
for mode in ("lora", "full", "floor"):
    for side in ("ours", "pytorch"):
        k = (side, mode)
        if k not in med:
            continue
        vs_peer = f"{med[k] / med[('pytorch', mode)]:.3f}" if side == "ours" and ("pytorch", mode) in med else ""
        vs_floor = f"{med[k] / med[(side, 'floor')]:.3f}" if mode != "floor" else ""
        vs_full = f"{med[k] / med[(side, 'full')]:.3f}" if mode == "lora" else ""
        peak = f"{mib(rss[k][0]):.0f}" if k in rss else ""
        delta = f"{mib(rss[k][0] - rss[k][1]):.0f}" if k in rss else ""
        name = "lora (C++)" if side == "ours" else "PyTorch (PEFT formula)"
        print(f"| {name} | {labels[mode]} | {med[k]:.1f} | {spread(k)} | {best[k]:.1f} | {flops[mode] / med[k] / 1e6:.1f} "
              f"| {vs_peer} | {vs_floor} | {vs_full} | {peak} | {delta} |")

print()
print("Targets (issue 4, from the medians):")
def check(name, value, limit):
    print(f"- {name}: {value:.3f} (target <= {limit}) {'met' if value <= limit else 'MISSED'}")
ours = lambda m: med[("ours", m)]
check("LoRA step / bare frozen GEMMs", ours("lora") / ours("floor"), 1.05)
if ("pytorch", "lora") in med:
    check("LoRA step / PyTorch's LoRA step", ours("lora") / med[("pytorch", "lora")], 0.92)
check("LoRA step / full fine-tuning step", ours("lora") / ours("full"), 0.70)
if "lora" in opt:
    t, b = opt["lora"]
    print(f"- optimizer state: {b} B for {t} trainable = {b / t:g} B each (target exactly 8) {'met' if b == 8 * t else 'MISSED'}")
if ("ours", "lora") in rss and ("ours", "full") in rss:
    check("LoRA peak RSS / full fine-tuning peak RSS", rss[("ours", "lora")][0] / rss[("ours", "full")][0], 0.6)

with open(dat, "w") as f:
    f.write("# side mode median_ms peak_rss_mib   (written by bench/compare.sh, read by bench/plot.sh)\n")
    for line in header:
        f.write("# " + line + "\n")
    for side in ("ours", "pytorch"):
        for mode in ("floor", "lora", "full"):
            k = (side, mode)
            if k in med:
                f.write(f"{side} {mode} {med[k]:.2f} {mib(rss[k][0]) if k in rss else 0:.1f}\n")
EOF
echo
echo "table: $OUT/compare.md; raw lines: $RAW; chart data: $OUT/summary.dat (bench/plot.sh draws it)"
