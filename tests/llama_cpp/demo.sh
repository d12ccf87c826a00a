#!/usr/bin/env bash
# The demo's llama.cpp check, and a third opinion on its exports:
#
#   demo.sh WORK_DIR DOMAIN_ADAPTATION
#
# Runs domain_adaptation --small with the llama.cpp runtime (WORK_DIR/runtime,
# shared with check.sh): it exports its base as GGUF and as a Hugging Face
# checkpoint, its adapters as GGUF and PEFT directories, and compares
# llama.cpp's next-token distributions after a prompt, base alone and with each
# adapter, with its own forward (within 1e-4; greedy continuations of 32 tokens
# identical). Then reference.py (float64 numpy, Hugging Face's formulas, no
# lora code) runs the Hugging Face export and the PEFT directories on the same
# prompts: its probabilities must match the library's within 1e-4 and its
# greedy continuations too. So all three exports are checked: GGUF base and
# adapters by llama.cpp, safetensors + config.json and PEFT by the reference.
#
# Exit status: 0 passed, 1 failed, 77 skipped (as check.sh).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 WORK_DIR DOMAIN_ADAPTATION" >&2
  exit 1
fi
work=$(mkdir -p "$1" && cd "$1" && pwd)
demo=$2
here=$(cd "$(dirname "$0")" && pwd)

# shellcheck source=runtime.sh
source "$here/runtime.sh"

out=$work/demo
rm -rf "$out"
status=0
"$demo" --small --quiet --out "$out" --llama-runtime "$work/runtime" >"$work/demo.log" 2>&1 || status=$?
sed -n '/^9\. Export/,/^11\. /p' "$work/demo.log" | sed '$d'
grep '^   \[' "$work/demo.log"
if (( status != 0 )); then
  echo "FAIL: domain_adaptation exited with $status (log: $work/demo.log)"
  exit 1
fi
passed=$(grep -c '\[PASS\] llama.cpp runs the exported' "$work/demo.log" || true)
if (( passed != 3 )); then
  echo "FAIL: expected 3 passing llama.cpp checks (base, base + legal, base + clinical), found $passed"
  exit 1
fi

echo "reference.py on the Hugging Face export ($out/llama/hf) and the PEFT directories:"
"$python" - "$here/reference.py" "$out/llama/hf" "$out/llama/llama_cpp_check.json" <<'PY'
import json, subprocess, sys
import numpy as np
reference, hf, record = sys.argv[1:4]
ok = True
for run in json.load(open(record)):
    args = [sys.executable, reference, hf, "--tokens", ",".join(map(str, run["tokens"])),
            "--greedy", str(len(run["greedy_lora"]))]
    if run["peft_dir"]:
        args += ["--adapter", run["peft_dir"]]
    ref = json.loads(subprocess.run(args, check=True, capture_output=True, text=True).stdout)
    diff = float(np.abs(np.array(ref["probs"]) - np.array(run["probs_lora"])).max())
    greedy_ok = ref["greedy"] == run["greedy_lora"]
    print(f"  {run['label']:16s} max |p_reference - p_lora| = {diff:.2e}  greedy "
          f"{'identical' if greedy_ok else 'DIFFERS'}")
    ok = ok and diff < 1e-4 and greedy_ok
print("PASS" if ok else "FAIL")
sys.exit(0 if ok else 1)
PY
