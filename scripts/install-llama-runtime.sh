#!/usr/bin/env bash
# Installs llama.cpp as node-llama-cpp ships it (prebuilt, Linux x64, CPU only)
# into DIR, for tests/llama_cpp/check.sh. Never run by the library's build.
#
#   scripts/install-llama-runtime.sh DIR
#
# A plain `npm install node-llama-cpp` pulls every platform's binaries (about
# 700 MB, CUDA and Vulkan included): optional dependencies are omitted and the
# one prebuilt package for this platform is named explicitly, at the same
# version. DIR/.installed holds the version once the install has been checked;
# a second run finds it and does nothing.
#
# Exit status: 0 installed (or already there), 2 bad usage or platform,
# 3 node or npm missing, 4 npm install failed (no network, registry down),
# 5 installed but llama.cpp's binary does not load.
set -euo pipefail

readonly kVersion=3.22.1
readonly kPlatformPackage=@node-llama-cpp/linux-x64

if [[ $# -ne 1 ]]; then
  echo "usage: $0 DIR" >&2
  exit 2
fi
dir=$1
marker=$dir/.installed

if [[ "$(uname -s)-$(uname -m)" != Linux-x86_64 ]]; then
  echo "install-llama-runtime: only Linux x86_64 is supported (found $(uname -s)-$(uname -m))" >&2
  exit 2
fi
for tool in node npm; do
  if ! command -v "$tool" >/dev/null; then
    echo "install-llama-runtime: '$tool' not found; node-llama-cpp $kVersion needs node 20 or newer with npm (Debian 12 ships 18: NodeSource's nodejs 20)" >&2
    exit 3
  fi
done
node_major=$(node -p 'process.versions.node.split(".")[0]')
if (( node_major < 20 )); then  # its package.json: "engines": {"node": ">=20.0.0"}
  echo "install-llama-runtime: node $(node --version) is too old, node-llama-cpp $kVersion needs 20 or newer" >&2
  exit 3
fi

if [[ -f $marker && "$(cat "$marker")" == "node-llama-cpp@$kVersion" && -d $dir/node_modules/node-llama-cpp ]]; then
  echo "install-llama-runtime: node-llama-cpp@$kVersion already installed in $dir, nothing to do"
  exit 0
fi

mkdir -p "$dir"
rm -f "$marker"
# A package.json of its own, so npm installs here and not into an enclosing project.
if [[ ! -f $dir/package.json ]]; then
  printf '{"name": "lora-llama-runtime", "private": true, "type": "module"}\n' >"$dir/package.json"
fi
echo "install-llama-runtime: installing node-llama-cpp@$kVersion and $kPlatformPackage@$kVersion into $dir"
# NODE_LLAMA_CPP_SKIP_DOWNLOAD: the postinstall step must not fetch llama.cpp's
# sources to build them when the prebuilt binary is missing; the check below
# fails instead. One retry, short waits: without network npm's defaults take
# minutes to give up, and a test that skips should not.
if ! (cd "$dir" && NODE_LLAMA_CPP_SKIP_DOWNLOAD=true npm install --no-audit --no-fund --omit=optional \
        --fetch-retries=1 --fetch-retry-mintimeout=1000 --fetch-retry-maxtimeout=5000 \
        --save-exact "node-llama-cpp@$kVersion" "$kPlatformPackage@$kVersion"); then
  echo "install-llama-runtime: npm install failed (no network or registry unreachable?)" >&2
  exit 4
fi

# The prebuilt CPU binary must load: ask for the CPU backend and read its version.
# (From a file: node-llama-cpp tests its binary in a forked copy of the running
# script, which `node -e` does not give it.)
cat >"$dir/check-runtime.mjs" <<'EOF2'
import {getLlama} from "node-llama-cpp";
const llama = await getLlama({gpu: false, build: "never", progressLogs: false});
console.log(`install-llama-runtime: llama.cpp ${llama.llamaCppRelease.release} loads (gpu: ${llama.gpu})`);
await llama.dispose();
EOF2
if ! (cd "$dir" && node check-runtime.mjs); then
  echo "install-llama-runtime: node-llama-cpp installed but its CPU binary does not load" >&2
  exit 5
fi
echo "node-llama-cpp@$kVersion" >"$marker"
echo "install-llama-runtime: done ($(du -sh "$dir/node_modules" | cut -f1) in $dir/node_modules)"
