# Sourced by check.sh and demo.sh: what both need before they run llama.cpp,
# with $work (the calling script's work directory) and $here (its folder) set.
#   skip MESSAGE   prints SKIP: MESSAGE and exits 77 (ctest's SKIP_RETURN_CODE)
#   $python        a Python with numpy: $LORA_PYTHON, else python3 on PATH, else the system's
#   $work/runtime  node-llama-cpp, installed by scripts/install-llama-runtime.sh (once; reused)

skip() {
  echo "SKIP: $*"
  exit 77
}

python=
for candidate in ${LORA_PYTHON:-} python3 /usr/bin/python3; do
  if command -v "$candidate" >/dev/null && "$candidate" -c 'import numpy' 2>/dev/null; then
    python=$candidate
    break
  fi
done
[[ -n $python ]] || skip "no python3 with numpy for the reference forward (set LORA_PYTHON)"

runtime_status=0
"$here/../../scripts/install-llama-runtime.sh" "$work/runtime" || runtime_status=$?
case $runtime_status in
  0) ;;
  3) skip "node >= 20 / npm not found (node-llama-cpp needs node 20; Debian 12 ships 18)" ;;
  4) skip "node-llama-cpp could not be installed (no network?)" ;;
  *) echo "FAIL: install-llama-runtime.sh exited with $runtime_status"; exit 1 ;;
esac
