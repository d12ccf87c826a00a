#!/usr/bin/env bash
# Installs the Debian 12 packages lora needs to build, test and benchmark, and
# generates the de_DE.UTF-8 locale (the checkpoint test's comma-decimal locale).
# Runs apt-get and locale-gen only when something is missing; uses sudo when not root.
# Usage: scripts/install-deps.sh [--bench]   (--bench adds python3-torch for bench/compare.sh)
set -euo pipefail

packages=(
  cmake make g++ pkg-config      # build
  libeigen3-dev                  # CPU backend
  libopenblas-dev                # CBLAS for the CPU backend's large GEMMs (LORA_USE_CBLAS)
  nlohmann-json3-dev             # safetensors headers, adapter_config.json
  libre2-dev                     # PEFT's rank_pattern / alpha_pattern (linear-time regex)
  libgtest-dev libgmock-dev      # tests
  libbenchmark-dev               # benchmarks
  clang libclang-rt-14-dev       # the libFuzzer targets (safetensors reader, PEFT loader)
  gnuplot-nox                    # charts
  locales                        # locale-gen, for the comma-decimal locale test_checkpoint uses
  python3-numpy                  # the reference forward of the llama.cpp check (tests/llama_cpp)
  libopenmpi-dev openmpi-bin     # lora::mpi: data-parallel training, its tests and example (mpirun)
)
if [[ "${1:-}" == "--bench" ]]; then
  packages+=(python3-torch)
fi

missing=()
for p in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$p" 2>/dev/null || true)
  [[ "$status" == "installed" ]] || missing+=("$p")
done
# grep without -q reads all of locale's output (no SIGPIPE under pipefail).
has_comma_locale() { locale -a 2>/dev/null | grep -ix 'de_DE.utf8' >/dev/null; }
locale_missing=0
has_comma_locale || locale_missing=1
if ((${#missing[@]} == 0 && locale_missing == 0)); then
  echo "install-deps: all ${#packages[@]} Debian packages and the de_DE.UTF-8 locale present"
  exit 0
fi

sudo=()
if [[ $(id -u) -ne 0 ]]; then
  command -v sudo >/dev/null || { echo "install-deps: need root or sudo to install: ${missing[*]} / generate de_DE.UTF-8" >&2; exit 1; }
  sudo=(sudo)
fi
if ((${#missing[@]} > 0)); then
  echo "install-deps: installing ${missing[*]}"
  "${sudo[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
if ((locale_missing)); then
  echo "install-deps: generating the de_DE.UTF-8 locale"
  "${sudo[@]}" sed -i 's/^# *de_DE.UTF-8 UTF-8/de_DE.UTF-8 UTF-8/' /etc/locale.gen
  "${sudo[@]}" locale-gen
fi
