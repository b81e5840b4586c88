#!/usr/bin/env bash
# Set up everything (idempotent) and run the main job on the embedded default: the end-to-end workflow on the tiny
# built-in models (no downloads), through a real ComfyUI in-process. Prints where the outputs went.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ENV_LINES=$(bash "$REPO/scripts/setup_env.sh")
export COMFYUI_DIR=$(sed -n 's/^COMFYUI_DIR=//p' <<<"$ENV_LINES")
PYTHON=$(sed -n 's/^PYTHON=//p' <<<"$ENV_LINES")
MAIN_WORKFLOWS=${MAIN_WORKFLOWS:-"$REPO/workflows/wan_demo_train_then_generate.json"}
exec "$PYTHON" "$REPO/scripts/run_workflow.py" $MAIN_WORKFLOWS --output "${MUSUBI_OUT:-$REPO/out/main_job}"
