#!/usr/bin/env bash
# Builds the CUDA test and benchmark programs for the GPU machine (an H200,
# sm_90), on a machine that needs no GPU. The result is build-device/bin:
#   test_cuda, test_cuda_host,   the programs (GoogleTest linked statically);
#   bench_cuda, nf4_dump         test_cuda_host uses lora::cuda from host C++;
#                                nf4_dump writes our NF4 bytes for bnb_check.py
#   lib/                         the shared libraries they need that a CUDA
#                                machine may lack (Google Benchmark's)
# CUDA's own libraries (cudart, cuBLAS, cuBLASLt 13) come from the GPU machine.
# Carry build-device/bin there and run bench/device/run.sh from the repo root.
#
# Environment: BUILD_DIR (default <repo>/build-device), JOBS (default 2),
# CUDACXX (default /usr/local/cuda/bin/nvcc), LORA_CMAKE_ARGS (extra cmake
# arguments, e.g. -DCMAKE_PREFIX_PATH=<dir with Eigen, GTest, benchmark> when
# building on a machine without them installed).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
build=${BUILD_DIR:-$repo/build-device}
jobs=${JOBS:-2}
nvcc=${CUDACXX:-/usr/local/cuda/bin/nvcc}
[ -x "$nvcc" ] || nvcc=$(command -v nvcc)

# shellcheck disable=SC2086  # LORA_CMAKE_ARGS is a list of arguments
cmake -S "$repo" -B "$build" \
  -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CUDA_COMPILER="$nvcc" \
  -DCMAKE_CUDA_ARCHITECTURES=90 \
  -DLORA_ENABLE_CUDA=ON \
  -DLORA_USE_CBLAS=OFF \
  -DLORA_USE_OPENMP=OFF \
  -DLORA_BUILD_TESTS=ON \
  -DLORA_BUILD_BENCHMARKS=ON \
  -DLORA_BUILD_EXAMPLES=OFF \
  -DLORA_INSTALL=OFF \
  ${LORA_CMAKE_ARGS:-}
cmake --build "$build" -j "$jobs" --target test_cuda test_cuda_host bench_cuda nf4_dump

bin="$build/bin"
rm -rf "$bin"
mkdir -p "$bin/lib"
cp "$build/tests/test_cuda" "$build/tests/test_cuda_host" "$build/bench/bench_cuda" "$build/bench/nf4_dump" "$bin/"

# Every shared library the programs load, except the C/C++ runtime (on every
# Linux) and CUDA's (on every CUDA machine), travels in bin/lib.
system='^(linux-vdso|libc\.|libm\.|libdl\.|librt\.|libpthread\.|ld-linux|libstdc\+\+\.|libgcc_s\.|libcudart\.|libcublas\.|libcublasLt\.)'
missing=0
for program in "$bin/test_cuda" "$bin/test_cuda_host" "$bin/bench_cuda" "$bin/nf4_dump"; do
  while read -r name _ path _; do
    [[ "$name" =~ $system ]] && continue
    if [ -z "$path" ] || [ "$path" = "not" ]; then
      echo "build.sh: $program needs $name, which was not found here" >&2
      missing=1
      continue
    fi
    cp -L "$path" "$bin/lib/$name"
  done < <(ldd "$program" | awk '/=>/ {print $1, $2, $3}')
done

echo "build.sh: built for sm_90 into $bin"
for program in "$bin/test_cuda" "$bin/test_cuda_host" "$bin/bench_cuda"; do
  echo "--- ldd $(basename "$program") (libraries in lib/ travel with it)"
  LD_LIBRARY_PATH="$bin/lib" ldd "$program" | sed 's/ (0x[0-9a-f]*)//'
done
echo "--- newest glibc symbol version needed: $(objdump -T "$bin"/test_cuda "$bin"/bench_cuda "$bin"/lib/* 2>/dev/null |
  grep -o 'GLIBC_[0-9.]*' | sort -uV | tail -1)"
du -sh "$bin"
exit "$missing"
