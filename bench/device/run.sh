#!/usr/bin/env bash
# The device run of issue 3, on the GPU machine, from the repository root:
#   1. the CUDA tests (build-device/bin/test_cuda, test_cuda_host)
#   2. compute-sanitizer memcheck on a small subset of them
#   3. the CUDA benchmarks (bench_cuda: bare cuBLAS GEMM, LoRA fwd+bwd, train step)
#   4. the PEFT peer (bench/device/peft_peer.py: the same layer in PyTorch + PEFT)
#   5. NF4 (issue 11): our GPU quantization of a seeded tensor (nf4_dump) against
#      bitsandbytes' quantize_4bit / dequantize_4bit byte for byte, or, where
#      bitsandbytes is absent, against a torch reference of its rules (bnb_check.py)
#   6. a short table, printed last: LoRA fwd+bwd TFLOP/s vs the bare GEMM's
#      (target >= 0.75), our train step vs PEFT's (target: faster), and the NF4
#      train step vs the dense one (BM_Nf4LoraStep / BM_LoraTrainStep, target <= 1.3);
#      then issue 15's targets: rate >= 0.95, step <= 0.80 x PEFT's fastest,
#      dropout step <= 1.05 x plain, a mixed batch of 16 adapters <= 1.15 x one
#      adapter, and PEFT's adapter_names inference >= 3 x ours
# Needs build-device/bin from bench/device/build.sh (run where the sources were
# built, then carried here). Without it, this script tries to build here with
# cmake (needs Eigen, GoogleTest and Google Benchmark: carry them in .deps/ as
# an install prefix, which is passed as CMAKE_PREFIX_PATH).
# Logs go to $OUT if set, else out/device; takes about 3 minutes on an H200.
set -uo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$repo" || exit 1
out=${OUT:-$repo/out/device}
mkdir -p "$out"
exec > >(tee "$out/run.log") 2>&1

bin=build-device/bin
export LD_LIBRARY_PATH="$repo/$bin/lib:/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}"
export PATH="$PATH:/usr/local/cuda/bin"
section() { printf '\n==== %s   [%s]\n' "$*" "$(date -u +%H:%M:%S)"; }

section "machine"
date -u '+%Y-%m-%d %H:%M:%S UTC'
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader || echo "nvidia-smi failed"
nvcc --version 2>/dev/null | tail -1

# cudart/cuBLAS 13 from the CUDA toolkit; failing that, from PyTorch's nvidia-* wheels.
if [ -x "$bin/test_cuda" ] && ldd "$bin/test_cuda" "$bin/bench_cuda" | grep -q "not found"; then
  site=$(python3 -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)
  for lib in libcublas.so.13 libcublasLt.so.13 libcudart.so.13; do
    dir=$(find "$site/nvidia" -name "$lib*" -printf '%h\n' 2>/dev/null | head -1)
    [ -n "$dir" ] && export LD_LIBRARY_PATH="$LD_LIBRARY_PATH:$dir"
  done
fi
ldd "$bin/test_cuda" "$bin/bench_cuda" 2>&1 | grep -E "cublas|cudart|benchmark|not found"

if [ ! -x "$bin/test_cuda" ] || [ ! -x "$bin/bench_cuda" ]; then
  section "build here ($bin is absent)"
  extra=""
  [ -d "$repo/.deps" ] && extra="-DCMAKE_PREFIX_PATH=$repo/.deps"
  BUILD_DIR="$repo/build-device" JOBS=16 LORA_CMAKE_ARGS="$extra" bash bench/device/build.sh ||
    echo "BUILD FAILED: carry build-device/bin from bench/device/build.sh, or Eigen/GTest/benchmark in .deps/"
fi

section "CUDA tests"
timeout 240 "$bin/test_cuda" --gtest_brief=1 > "$out/tests.txt" 2>&1
tests_rc=$?
timeout 60 "$bin/test_cuda_host" --gtest_brief=1 >> "$out/tests.txt" 2>&1 || tests_rc=1
cat "$out/tests.txt"

section "compute-sanitizer memcheck (small cases)"
memcheck_filter='CudaTest.DropoutMatchesCpuBitForBit:CudaTest.FusedAdamAndAdamW*:CudaTest.SumSquares*'
memcheck_filter+=':CudaTest.CopiesHonour*:CudaTest.GatherAndScatter*:CudaGemm/0.*:CudaGemm/3.*'
memcheck_filter+=':CudaLinear/1.ParityWithCpu*:CudaLinear/1.MergeAndUnmerge*'
memcheck_filter+=':CudaTest.GemmGroupedEqualsOneGemmPerTerm:CudaModelOps/0.AdapterSetMixedBatchOfManyAdapters'
timeout 200 compute-sanitizer --tool memcheck --error-exitcode 99 \
  "$bin/test_cuda" --gtest_brief=1 --gtest_filter="$memcheck_filter" > "$out/memcheck.txt" 2>&1
memcheck_rc=$?
tail -n 25 "$out/memcheck.txt"

section "CUDA benchmarks"
timeout 150 "$bin/bench_cuda" --benchmark_repetitions=5 --benchmark_report_aggregates_only=true \
  --benchmark_min_time=0.3 --benchmark_out="$out/bench_cuda.json" --benchmark_out_format=json
bench_rc=$?

section "PEFT peer"
# PEFT's default (fp32 adapters over the bf16 base), then its fastest setup here:
# the adapter in bf16 (autocast_adapter_dtype=False) and PyTorch's fused AdamW.
: > "$out/peft.txt"
peft_rc=0
for setup in "" "--adapter-dtype base --adamw fused" "--adapter-dtype base --adapters 16"; do
  # shellcheck disable=SC2086
  PYTHONUNBUFFERED=1 timeout 120 python3 bench/device/peft_peer.py --warmup 10 --steps 100 --inner 10 $setup \
    >> "$out/peft.txt" 2>&1 || peft_rc=$?
done
cat "$out/peft.txt"

section "NF4 vs bitsandbytes"
mkdir -p "$out/nf4"
python3 -c 'import bitsandbytes, sys; print("bitsandbytes", bitsandbytes.__version__)' 2>&1 | tail -1
{ timeout 60 "$bin/nf4_dump" "$out/nf4" && timeout 120 python3 bench/device/bnb_check.py "$out/nf4"; } > "$out/nf4.txt" 2>&1
nf4_rc=$?
cat "$out/nf4.txt"

status=0
[ "$nf4_rc" -eq 0 ] || { echo "NF4 CHECK FAILED (rc $nf4_rc)"; status=1; }
[ "$tests_rc" -eq 0 ] || { echo "CUDA TESTS FAILED (rc $tests_rc)"; status=1; }
[ "$memcheck_rc" -eq 0 ] || { echo "MEMCHECK REPORTED ERRORS OR FAILED TO RUN (rc $memcheck_rc)"; status=1; }
[ "$bench_rc" -eq 0 ] || { echo "BENCHMARKS FAILED (rc $bench_rc)"; status=1; }
[ "$peft_rc" -eq 0 ] || { echo "PEFT PEER FAILED (rc $peft_rc)"; status=1; }

section "summary"
python3 - "$out/bench_cuda.json" "$out/peft.txt" "$tests_rc" "$memcheck_rc" "$bench_rc" "$peft_rc" "$nf4_rc" <<'PY' | tee "$out/summary.txt"
import json, sys

bench_path, peft_path, tests_rc, memcheck_rc, bench_rc, peft_rc, nf4_rc = sys.argv[1:8]
median = {}
try:
    with open(bench_path) as f:
        data = json.load(f)
    gpu = data.get("context", {}).get("gpu", "?")
    for b in data.get("benchmarks", []):
        if b.get("aggregate_name") == "median":
            median[b["run_name"].replace("/manual_time", "")] = b
except Exception as e:  # the benchmarks failed or never ran
    gpu = f"? ({e})"
peft = {}  # what -> the fastest PEFT setup's line
try:
    for line in open(peft_path):
        if line.startswith("peer=peft") and "what=" in line:
            kv = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            best = peft.get(kv["what"])
            if best is None or float(kv["median_ms"]) < float(best["median_ms"]):
                peft[kv["what"]] = kv
except OSError:
    pass

def get(name, key):
    b = median.get(name)
    return float(b[key]) if b and key in b else None

def fmt(x, digits=2):
    return "n/a" if x is None else f"{x:.{digits}f}"

gemm_tf = get("BM_BareGemm", "TFLOP/s")
lora_tf = get("BM_LoraForwardBackward", "TFLOP/s")
ours_ms = get("BM_LoraTrainStep", "ms")
ours_fb_ms = get("BM_LoraForwardBackward", "ms")
peft_ms = float(peft["train_step"]["median_ms"]) if "train_step" in peft else None
peft_fb_ms = float(peft["fwd_bwd"]["median_ms"]) if "fwd_bwd" in peft else None
rate_ratio = lora_tf / gemm_tf if lora_tf and gemm_tf else None
speedup = peft_ms / ours_ms if peft_ms and ours_ms else None

def verdict(ok):
    return "n/a" if ok is None else ("MET" if ok else "MISSED")

print("breakdown (medians):")
for name, b in median.items():
    extra = f"  {b['GB/s']:8.1f} GB/s" if "GB/s" in b else ""
    print(f"  {name:28s} {b.get('ms', float('nan')):8.4f} ms  {b.get('TFLOP/s', float('nan')):7.1f} TFLOP/s{extra}"
          f"  {b.get('label', '')}")
print()
print(f"gpu: {gpu}; shape N=8192 d_in=d_out=4096 r=16 bf16 (medians of 5 repetitions of 10-call groups; PEFT: median of 10 groups of 10 steps, its fastest setup)")
for what, kv in peft.items():
    print(f"PEFT {what}: fastest setup adapter_dtype={kv.get('adapter_dtype')} adamw={kv.get('adamw')}")
print(f"exit codes: tests={tests_rc} memcheck={memcheck_rc} bench={bench_rc} peft={peft_rc} nf4_check={nf4_rc}")
nf4_ms = get("BM_Nf4LoraStep", "ms")
drop_ms = get("BM_LoraTrainStepDropout", "ms")
drop_ratio = drop_ms / ours_ms if drop_ms and ours_ms else None
mixed_ms = get("BM_MixedBatchTrainStep", "ms")
mixed_ratio = mixed_ms / ours_ms if mixed_ms and ours_ms else None
mixed_drop_ms = get("BM_MixedBatchTrainStepDropout", "ms")
mixed_drop_ratio = mixed_drop_ms / drop_ms if mixed_drop_ms and drop_ms else None
mixed_inf_ms = get("BM_MixedBatchInference", "ms")
peft_mixed_ms = float(peft["mixed_inference"]["median_ms"]) if "mixed_inference" in peft else None
mixed_speedup = peft_mixed_ms / mixed_inf_ms if peft_mixed_ms and mixed_inf_ms else None
nf4_ratio = nf4_ms / ours_ms if nf4_ms and ours_ms else None
rows = [
    ("LoRA fwd+bwd TFLOP/s vs bare cuBLAS bf16 GEMM TFLOP/s", fmt(lora_tf, 1), fmt(gemm_tf, 1),
     fmt(rate_ratio), ">= 0.75", verdict(None if rate_ratio is None else rate_ratio >= 0.75)),
    ("train step ms (fwd+bwd+AdamW): PEFT / ours", fmt(ours_ms, 3), fmt(peft_ms, 3),
     fmt(speedup), "> 1", verdict(None if speedup is None else speedup > 1.0)),
    ("fwd+bwd ms: PEFT / ours (for reference)", fmt(ours_fb_ms, 3), fmt(peft_fb_ms, 3),
     fmt(peft_fb_ms / ours_fb_ms if peft_fb_ms and ours_fb_ms else None), "", ""),
    ("NF4 train step ms / dense train step ms", fmt(nf4_ms, 3), fmt(ours_ms, 3),
     fmt(nf4_ratio), "<= 1.3", verdict(None if nf4_ratio is None else nf4_ratio <= 1.3)),
    ("NF4 dequantize 4096x4096 -> bf16: ns/value, GB/s", fmt(get("BM_Nf4Dequantize", "ns/value"), 4),
     fmt(get("BM_Nf4Dequantize", "GB/s"), 1), "", "", ""),
    ("issue 15: LoRA fwd+bwd rate / bare GEMM rate", fmt(lora_tf, 1), fmt(gemm_tf, 1), fmt(rate_ratio), ">= 0.95",
     verdict(None if rate_ratio is None else rate_ratio >= 0.95)),
    ("issue 15: train step ms, ours / PEFT's fastest", fmt(ours_ms, 3), fmt(peft_ms, 3),
     fmt(ours_ms / peft_ms if peft_ms and ours_ms else None), "<= 0.80",
     verdict(None if not (peft_ms and ours_ms) else ours_ms / peft_ms <= 0.80)),
    ("issue 15: dropout 0.1 step / no-dropout step", fmt(drop_ms, 3), fmt(ours_ms, 3), fmt(drop_ratio), "<= 1.05",
     verdict(None if drop_ratio is None else drop_ratio <= 1.05)),
    ("issue 15: mixed batch of 16 adapters step / single-adapter step", fmt(mixed_ms, 3), fmt(ours_ms, 3),
     fmt(mixed_ratio), "<= 1.15", verdict(None if mixed_ratio is None else mixed_ratio <= 1.15)),
    ("mixed batch of 16, dropout 0.1: step / single-adapter dropout step (for reference)", fmt(mixed_drop_ms, 3),
     fmt(drop_ms, 3), fmt(mixed_drop_ratio), "", ""),
    ("issue 15: PEFT adapter_names inference / our mixed inference (16 adapters)", fmt(mixed_inf_ms, 3),
     fmt(peft_mixed_ms, 3), fmt(mixed_speedup), ">= 3", verdict(None if mixed_speedup is None else mixed_speedup >= 3)),
    ("NF4 base bytes per parameter", fmt(get("BM_Nf4LoraStep", "base bytes/param"), 4), "", "", "<= 0.52",
     verdict(None if get("BM_Nf4LoraStep", "base bytes/param") is None
             else get("BM_Nf4LoraStep", "base bytes/param") <= 0.52)),
]
header = ("metric", "ours", "reference", "ratio", "target", "")
widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
for r in [header] + rows:
    print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths)) + " |")
PY

exit "$status"
