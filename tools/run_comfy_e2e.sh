#!/usr/bin/env bash
# End-to-end check of the bundled API workflow on a real ComfyUI (CPU, tiny demo weights).
#
# Needs the harness install (../shared/tools/comfy_harness/setup.sh -> $COMFY_ROOT) and a T5-XXL
# file with the real shapes in models/text_encoders/ (make_random_t5xxl.py). It
#   1. installs our runtime dependencies into the harness venv (ray, einops, safetensors, av),
#   2. writes the tiny demo DiT and VAE (real key names, random weights) into models/,
#   3. links this folder into custom_nodes/ under a name that is not `mochi_xdit`,
#   4. starts the server, then runs: the workflow (success), an interrupted run, an invalid degree
#      combination (HTTP 400), and the workflow again (the pool still works after the interrupt),
#   5. stops the server (and with it Ray and the rank actors).
# Prints each run's harness exit code; exits non-zero if any outcome is not the expected one.
#
#   bash tools/run_comfy_e2e.sh            # HARNESS=... COMFY_ROOT=... PORT=... to override
set -u
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
COMFY_ROOT="${COMFY_ROOT:-/tmp/comfy}"
COMFY_DIR="${COMFY_DIR:-$COMFY_ROOT/ComfyUI}"
VENV_PY="${COMFY_VENV:-$COMFY_ROOT/venv}/bin/python"
HARNESS="${HARNESS:-$(cd "$HERE/.." && pwd)/shared/tools/comfy_harness/run_workflow.py}"
[ -f "$HARNESS" ] || HARNESS=/work/shared/tools/comfy_harness/run_workflow.py
PORT="${PORT:-8188}"
PACK_NAME="${PACK_NAME:-ComfyUI-Mochi-xDiT}"
T5_FILE="${T5_FILE:-t5xxl_random_fp8.safetensors}"
WORKFLOW="$HERE/workflows/api/mochi_xdit_text_to_video_api.json"
OUT="${OUT:-$COMFY_ROOT/e2e}"
mkdir -p "$OUT"
export COMFY_ROOT COMFY_DIR

[ -f "$COMFY_DIR/models/text_encoders/$T5_FILE" ] || { echo "missing $COMFY_DIR/models/text_encoders/$T5_FILE (make_random_t5xxl.py)"; exit 2; }

echo "== 1. dependencies in the harness venv"
"$VENV_PY" -m pip install -q --disable-pip-version-check ray einops safetensors av || exit 2

echo "== 2. demo weights"
"$VENV_PY" - "$HERE" "$COMFY_DIR/models" <<'EOF' || exit 2
import importlib.util, os, sys
here, models = sys.argv[1], sys.argv[2]
spec = importlib.util.spec_from_file_location("mochi_xdit", os.path.join(here, "__init__.py"),
                                              submodule_search_locations=[here])
package = importlib.util.module_from_spec(spec); sys.modules["mochi_xdit"] = package; spec.loader.exec_module(package)
from safetensors.torch import save_file
from mochi_xdit.mochi.demo import DEMO_DIT_CONFIG, DEMO_VAE_CONFIG, random_dit_state_dict, random_vae_state_dict
save_file(random_dit_state_dict(DEMO_DIT_CONFIG, seed=0), os.path.join(models, "diffusion_models", "mochi_xdit_demo_dit.safetensors"))
vae = {f"decoder.{k}": v for k, v in random_vae_state_dict(DEMO_VAE_CONFIG, seed=1).items()}
save_file(vae, os.path.join(models, "vae", "mochi_xdit_demo_vae.safetensors"))
print("wrote demo DiT and VAE into", models)
EOF

echo "== 3. link the pack as custom_nodes/$PACK_NAME"
LINK="$COMFY_DIR/custom_nodes/$PACK_NAME"
if [ -L "$LINK" ]; then rm "$LINK"; fi
[ -e "$LINK" ] && { echo "$LINK exists and is not a link"; exit 2; }
ln -s "$HERE" "$LINK"

SMALL=(--set "1.clip_name=\"$T5_FILE\"" --set '5.dit_name="mochi_xdit_demo_dit.safetensors"'
       --set '5.vae_name="mochi_xdit_demo_vae.safetensors"' --set 5.world_size=2
       --set 4.width=64 --set 4.height=48 --set 4.length=13 --set 6.steps=6
       --set '9.filename_prefix="video/mochi_xdit_e2e"')
H=("$VENV_PY" "$HARNESS" --port "$PORT")
FAIL=0
run() {  # name expected-exit args...
    local name="$1" expected="$2"; shift 2
    echo "== run: $name"
    "${H[@]}" "$@" 2>&1 | tee "$OUT/$name.log"
    local code=${PIPESTATUS[0]}
    echo "== $name: harness exit code $code (expected $expected)"
    [ "$code" = "$expected" ] || FAIL=1
}

echo "== 4. server"
"${H[@]}" --start-only --server-arg='--preview-method latent2rgb' 2>&1 | tee "$OUT/server_start.log"
SERVER_PID=$(grep -o 'running: pid [0-9]*' "$OUT/server_start.log" | tail -1 | awk '{print $3}')
LOG="$COMFY_ROOT/server_$PORT.log"
if grep -q "IMPORT FAILED.*$PACK_NAME\|Cannot import.*$PACK_NAME" "$LOG"; then
    echo "pack import failed:"; tail -40 "$LOG"; FAIL=1
fi
grep -q "$PACK_NAME" "$LOG" && grep "$PACK_NAME" "$LOG" | head -3

run success 0 "$WORKFLOW" --reuse "${SMALL[@]}" --json-out "$OUT/success.json"
run interrupt 0 "$WORKFLOW" --reuse "${SMALL[@]}" --set 6.steps=400 --set 6.seed=7 --interrupt-after 20 \
    --expect interrupted --json-out "$OUT/interrupt.json"
run invalid_degrees 0 "$WORKFLOW" --reuse "${SMALL[@]}" --set 5.world_size=4 --set 5.ulysses_degree=2 \
    --set 5.ring_degree=1 --set 5.cfg_degree=1 --expect invalid --json-out "$OUT/invalid.json"
run after_interrupt 0 "$WORKFLOW" --reuse "${SMALL[@]}" --set 6.seed=8 --json-out "$OUT/after_interrupt.json"

echo "== run: websocket trace (progress messages and latent previews)"
SET_ARGS=()
for ((i = 1; i < ${#SMALL[@]}; i += 2)); do SET_ARGS+=(--set "${SMALL[$i]}"); done
"$VENV_PY" "$HERE/tools/comfy_ws_trace.py" "$WORKFLOW" --port "$PORT" "${SET_ARGS[@]}" --set 6.seed=9 \
    | tee "$OUT/ws_trace.json" || FAIL=1

echo "== 5. stop the server (pid ${SERVER_PID:-?})"
if [ -n "${SERVER_PID:-}" ]; then kill -TERM -- "-$SERVER_PID" 2>/dev/null; sleep 5; fi
rm -f "$LINK"
echo "== e2e result: $([ $FAIL = 0 ] && echo OK || echo FAILED)"
exit $FAIL
