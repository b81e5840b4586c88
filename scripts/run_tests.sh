#!/usr/bin/env bash
# Set up everything (idempotent) and run the whole test suite: engine, in-process ComfyUI, server and browser tiers.
# Extra arguments go to pytest, e.g. `-m "not browser"`; naming test files or node ids (`tests/test_x.py`,
# `tests/test_x.py::test_y`) runs only those instead of the whole `tests` folder.
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
ENV_LINES=$(WITH_BROWSER=1 bash "$REPO/scripts/setup_env.sh") || { echo "set-up failed" >&2; exit 1; }
COMFYUI_DIR=$(sed -n 's/^COMFYUI_DIR=//p' <<<"$ENV_LINES")
PYTHON=$(sed -n 's/^PYTHON=//p' <<<"$ENV_LINES")
cd "$REPO"
export COMFYUI_DIR
TARGETS=(tests)
for arg in "$@"; do
  [ -e "${arg%%::*}" ] && [ "${arg#-}" = "$arg" ] && TARGETS=()   # an explicit path: pytest gets only what was named
done
"$PYTHON" -m pytest ${TARGETS[@]+"${TARGETS[@]}"} "$@"
rc=$?
# pytest exit 5 = no tests collected: that is a failure for CI, not a pass.
[ "$rc" = 5 ] && { echo "no tests were collected" >&2; exit 1; }
exit "$rc"
