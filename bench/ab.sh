#!/usr/bin/env bash
# Before and after in one process: bench_paired built over two revisions of the
# library (bench_ab), so that a change is measured against its parent within
# each round instead of across processes, whose speed drifts on a shared machine.
#
#   bench/ab.sh REV_A [REV_B] [d N r rounds]
#   bench/ab.sh HEAD~3 . 1024 512 16 21        # HEAD~3 against the working tree
#
# REV_A, REV_B: git revisions, or "." for the working tree (REV_B's default).
# Each side is that revision's include/ and bench/workload.hpp; this tree's
# bench_paired.cpp and paired_steps.cpp drive both, so any revision with
# bench/workload.hpp's LoraWorkload and FrozenGemms works. Prints, per round and
# as medians, A's and B's LoRA and dropout-0.1 steps over one floor (the frozen
# GEMMs) and B/A.
#
# Environment: BUILD_DIR (default <repo>/build-ab; the sides go to BUILD_DIR/ab-src).
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
build=${BUILD_DIR:-$root/build-ab}
if [ $# -lt 1 ]; then
  sed -n '2,16p' "$0" >&2
  exit 2
fi
rev_a=$1
shift
rev_b=.
if [ $# -gt 0 ] && ! [[ $1 =~ ^[0-9]+$ ]]; then
  rev_b=$1
  shift
fi

# describe REV: "." as "working tree", else the short hash and subject.
describe() {
  if [ "$1" = . ]; then
    echo "working tree (on $(git -C "$root" rev-parse --short HEAD))"
  else
    git -C "$root" log -1 --format='%h %s' "$1"
  fi
}
# extract REV DIR: the revision's include/ and bench/workload.hpp into DIR.
extract() {
  mkdir -p "$2/bench"
  if [ "$1" = . ]; then
    cp -r "$root/include" "$2/"
    cp "$root/bench/workload.hpp" "$2/bench/"
  else
    git -C "$root" archive "$1" include bench/workload.hpp | tar -x -m -C "$2"  # -m: new times, so make rebuilds the side
  fi
}

src=$build/ab-src
rm -rf "$src"
extract "$rev_a" "$src/a"
extract "$rev_b" "$src/b"
log=$build/ab-build.log
if ! { cmake -S "$root" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLORA_ENABLE_CUDA=OFF -DLORA_BUILD_TESTS=OFF \
  -DLORA_BUILD_EXAMPLES=OFF -DLORA_BUILD_BENCHMARKS=ON -DLORA_AB_A="$src/a" -DLORA_AB_B="$src/b" &&
  cmake --build "$build" -j2 --target bench_ab; } >"$log" 2>&1; then
  tail -n 40 "$log" >&2
  echo "ab.sh: the build failed (whole log: $log)" >&2
  exit 1
fi
echo "A: $(describe "$rev_a")"
echo "B: $(describe "$rev_b")"
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//'), $(nproc) cores," \
  "load $(cut -d' ' -f1-3 /proc/loadavg)"
"$build/bench/bench_ab" "$@"
