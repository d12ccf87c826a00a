#!/usr/bin/env bash
# A LoRA adapter GGUF written by lora::io::save_gguf_adapter, applied by the
# real llama.cpp engine, must give the next-token probabilities of Hugging
# Face's forward with W + s B A (reference.py, float64 numpy):
#
#   check.sh WORK_DIR [MAKE_TINY_LLAMA]
#
# WORK_DIR (owned by this script): runtime/ (node-llama-cpp, installed once by
# scripts/install-llama-runtime.sh and reused) and model/ (make_tiny_llama's
# files, rewritten each run). MAKE_TINY_LLAMA defaults to
# WORK_DIR/../make_tiny_llama. For the base alone, base + adapter at scale 1 and
# 0.5: max |p_llama.cpp - p_reference| over the vocabulary after a prompt must be
# below 1e-4, and the greedy continuations of 32 tokens identical (the adapter
# stored as F16 / BF16: below 1e-3 / 1e-2). Controls must
# differ: the base without its adapter, the adapter exported without llama.cpp's
# rope row order, and exported without its alpha_pattern folded into B.
#
# Exit status: 0 passed, 1 failed, 77 skipped (no node / npm, no network for
# the first install, no python3 with numpy): ctest's SKIP_RETURN_CODE.
set -euo pipefail

if [[ $# -lt 1 || $# -gt 2 ]]; then
  echo "usage: $0 WORK_DIR [MAKE_TINY_LLAMA]" >&2
  exit 1
fi
work=$(mkdir -p "$1" && cd "$1" && pwd)
maker=${2:-$work/../make_tiny_llama}
here=$(cd "$(dirname "$0")" && pwd)
readonly kTolerance=1e-4 kGreedy=32 kPrompt=5,17,9,30,41,3,22,60,11,47,33,8

# shellcheck source=runtime.sh
source "$here/runtime.sh"

model=$work/model
rm -rf "$model"
"$maker" "$model"

# Runs llama.cpp (scripts/llama-eval.mjs) and the reference on one configuration and
# compares them; prints one line. compare ARGS: name, llama.cpp's adapter file or
# "", the reference's adapter dir or "", scale, "match" or "differ", and the
# tolerance (default kTolerance).
worst=0
compare() {
  local name=$1 gguf=$2 peft=$3 scale=$4 expect=$5 tolerance=${6:-$kTolerance}
  local llama_args=() reference_args=()
  [[ -n $gguf ]] && llama_args=(--lora "$gguf" --scale "$scale")
  [[ -n $peft ]] && reference_args=(--adapter "$peft" --scale "$scale")
  node "$here/../../scripts/llama-eval.mjs" --runtime "$work/runtime" --model "$model/base.gguf" "${llama_args[@]}" \
    --tokens "$kPrompt" --greedy "$kGreedy" >"$model/$name.llama.json"
  "$python" "$here/reference.py" "$model/hf" "${reference_args[@]}" --tokens "$kPrompt" --greedy "$kGreedy" \
    >"$model/$name.reference.json"
  "$python" - "$model/$name.llama.json" "$model/$name.reference.json" "$name" "$expect" "$tolerance" <<'EOF'
import json, sys
import numpy as np
llama, reference = (json.load(open(p)) for p in sys.argv[1:3])
name, expect, tolerance = sys.argv[3], sys.argv[4], float(sys.argv[5])
p_llama, p_ref = np.array(llama["probs"]), np.array(reference["probs"])
assert p_llama.shape == p_ref.shape, f"{name}: {p_llama.shape} vs {p_ref.shape} probabilities"
diff = float(np.abs(p_llama - p_ref).max())
same = sum(a == b for a, b in zip(llama["greedy"], reference["greedy"]))
first = next((i for i, (a, b) in enumerate(zip(llama["greedy"], reference["greedy"])) if a != b), None)
n = len(reference["greedy"])
matches = diff < tolerance and llama["greedy"] == reference["greedy"]
print(f"{name:24s} max |p_llama.cpp - p_ref| = {diff:.3e} (tolerance {tolerance:g})  greedy {same}/{n} equal"
      + ("" if first is None else f" (first difference at {first})")
      + f"  top token {int(p_llama.argmax())} vs {int(p_ref.argmax())}")
if expect == "match" and not matches:
    print(f"FAIL: {name}: llama.cpp disagrees with the reference (tolerance {tolerance})")
    print("  llama.cpp greedy:", llama["greedy"]); print("  reference greedy:", reference["greedy"])
    sys.exit(1)
if expect == "differ" and matches:
    print(f"FAIL: {name}: expected to differ from the reference, but matches: the check cannot see this error")
    sys.exit(1)
print(f"DIFF {diff if expect == 'match' and tolerance <= 1e-4 else 0.0}", file=sys.stderr)
EOF
}

echo "llama_cpp check: prompt $kPrompt, $kGreedy greedy tokens, tolerance $kTolerance, python $python"
failed=0
run() {
  local out
  if ! out=$(compare "$@" 2>&1); then
    echo "$out" | grep -v '^DIFF '
    failed=1
    return
  fi
  echo "$out" | grep -v '^DIFF '
  local d
  d=$(echo "$out" | sed -n 's/^DIFF //p')
  worst=$("$python" -c "print(max($worst, $d))")
}
run base "" "" 1 match
run adapter_scale_1 "$model/adapter.gguf" "$model/hf/adapter" 1 match
run adapter_scale_0.5 "$model/adapter.gguf" "$model/hf/adapter" 0.5 match
# F16 / BF16 adapters: llama.cpp multiplies them with activations rounded to the
# same type, so the error is the type's (measured 6e-5 and 1.5e-3), not the export's.
run adapter_f16 "$model/adapter_f16.gguf" "$model/hf/adapter" 1 match 1e-3
run adapter_bf16 "$model/adapter_bf16.gguf" "$model/hf/adapter" 1 match 1e-2
# Controls: wrong exports (and no adapter at all) that the comparison must see.
run control_no_adapter "" "$model/hf/adapter" 1 differ
run control_unpermuted_qk "$model/adapter_unpermuted.gguf" "$model/hf/adapter" 1 differ
run control_unfolded "$model/adapter_unfolded.gguf" "$model/hf/adapter" 1 differ
echo "largest probability difference of the F32 runs (base, adapter at scale 1 and 0.5): $worst"
if (( failed )); then
  echo "FAIL"
  exit 1
fi
echo "PASS"
