#!/usr/bin/env bash
# Builds the safetensors reader's libFuzzer target with clang (ASan + UBSan) and
# runs it for a bounded time; exits non-zero on any finding (crash, sanitizer
# report, leak, timeout, failed round trip) or build failure.
#
#   fuzz/run.sh [SECONDS]          default 60; env CXX (default clang++-14, else clang++)
#
# Findings are written to build-fuzz/findings/ (crash-*, timeout-*, ...); rerun one with
#   build-fuzz/safetensors_fuzz build-fuzz/findings/<file>
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${LORA_FUZZ_DIR:-$root/build-fuzz}"
cxx="${CXX:-$(command -v clang++-14 || command -v clang++)}"
mkdir -p "$out/corpus" "$out/findings"

# 1. Build. -O1 -g as libFuzzer recommends; UBSan findings abort instead of printing and going on.
"$cxx" -std=c++17 -O1 -g -fno-omit-frame-pointer \
  -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
  -I"$root/include" "$root/fuzz/safetensors_fuzz.cpp" -o "$out/safetensors_fuzz"

# 2. The working corpus starts from the committed seeds; new inputs found go to $out/corpus, never into git.
cp -n "$root"/fuzz/corpus/* "$out/corpus/" 2>/dev/null || true

# 3. Run. -max_len covers the seeds with room to grow; each input must finish within 10 s and 2 GB.
cd "$out"
ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
  ./safetensors_fuzz corpus \
  -dict="$root/fuzz/safetensors.dict" \
  -max_total_time="$seconds" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$out/findings/" -print_final_stats=1
echo "fuzz/run.sh: no finding in ${seconds} s"
