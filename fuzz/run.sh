#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each for a
# bounded time; exits non-zero on any finding (crash, sanitizer report, leak,
# timeout, failed round trip) or build failure.
#
#   safetensors_fuzz   the safetensors reader and writer (seeds: fuzz/corpus)
#   peft_fuzz          load_peft (adapter_config.json + weights), the
#                      model.safetensors.index.json reader and ModelReader (seeds: fuzz/corpus_peft)
#   checkpoint_fuzz    load_checkpoint: header, metadata, tensors; a refused
#                      checkpoint must change nothing (seed: written by the target itself)
#   gguf_fuzz          GgufReader, GgufWriter and adapter_from_gguf (seed: a llama
#                      adapter written by the target itself)
#
#   fuzz/run.sh [SECONDS]          default 60, split evenly between the targets;
#                                  env CXX (default clang++-14, else clang++)
#
# Findings are written to build-fuzz/findings/ (crash-*, timeout-*, ...); rerun one with
#   build-fuzz/<target> build-fuzz/findings/<file>
set -euo pipefail

seconds="${1:-60}"
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${LORA_FUZZ_DIR:-$root/build-fuzz}"
cxx="${CXX:-$(command -v clang++-14 || command -v clang++)}"
targets=(safetensors_fuzz:corpus:safetensors.dict peft_fuzz:corpus_peft:peft.dict
         checkpoint_fuzz:corpus_checkpoint:checkpoint.dict gguf_fuzz:corpus_gguf:gguf.dict)
per_target=$((seconds / ${#targets[@]}))
((per_target > 0)) || per_target=1
mkdir -p "$out/findings"

# 1. Build, side by side. -O1 -g as libFuzzer recommends; UBSan findings abort instead of printing and going on.
builds=()
for entry in "${targets[@]}"; do
  IFS=: read -r target seeds dict <<<"$entry"
  "$cxx" -std=c++17 -O1 -g -fno-omit-frame-pointer \
    -fsanitize=fuzzer,address,undefined -fno-sanitize-recover=all \
    -I"$root/include" "$root/fuzz/$target.cpp" -o "$out/$target" $(pkg-config --cflags --libs eigen3 re2) &
  builds+=($!)
done
for pid in "${builds[@]}"; do wait "$pid"; done  # set -e: a failed build stops here

for entry in "${targets[@]}"; do
  IFS=: read -r target seeds dict <<<"$entry"
  # 2. The working corpus starts from the committed seeds; new inputs found go to $out, never into git.
  #    A target that makes its own seed writes it to $LORA_FUZZ_WRITE_SEED before the corpus is read.
  mkdir -p "$out/$seeds"
  cp -n "$root/fuzz/$seeds"/* "$out/$seeds/" 2>/dev/null || true

  # 3. Run. -max_len covers the seeds with room to grow; each input must finish within 10 s and 2 GB.
  (cd "$out" && ASAN_OPTIONS="detect_leaks=1:abort_on_error=1" UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1" \
    LORA_FUZZ_WRITE_SEED="$out/$seeds/seed" "./$target" "$seeds" \
    -dict="$root/fuzz/$dict" \
    -max_total_time="$per_target" -max_len=4096 -timeout=10 -rss_limit_mb=2048 \
    -artifact_prefix="$out/findings/" -print_final_stats=1)
  echo "fuzz/run.sh: $target: no finding in ${per_target} s"
done
