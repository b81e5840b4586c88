#!/usr/bin/env bash
# Mutation testing of the engine's numerical core with mutmut, on CPU. Not part of CI (minutes to hours).
# The scope is [tool.mutmut] in pyproject.toml; narrow it for one run with space-separated lists:
#   MUTATE="engine/sampling/schedule.py engine/sampling/solvers.py" TESTS="tests/test_engine_sampling.py" \
#     bash scripts/mutation_test.sh
# It works in a scratch copy (MUTMUT_WORK, default $TMPDIR/musubi-mutmut), never in the checkout, and ends with
# the survivors and their count. Inspect one: `cd "$MUTMUT_WORK" && mutmut show NAME`.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-$(command -v python3)}
[ -x "${MUSUBI_ENV:-$HOME/.cache/comfyui-musubi}/venv/bin/python" ] && PYTHON=${MUSUBI_ENV:-$HOME/.cache/comfyui-musubi}/venv/bin/python
"$PYTHON" -c "import mutmut" 2>/dev/null || { echo "mutmut is missing: pip install -r requirements-dev.txt" >&2; exit 1; }
WORK=${MUTMUT_WORK:-${TMPDIR:-/tmp}/musubi-mutmut}
rm -rf "$WORK" && mkdir -p "$WORK"
cp -r "$REPO/engine" "$REPO/tests" "$REPO/pyproject.toml" "$WORK/"
find "$WORK" -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
# one-line lists in [tool.mutmut] replaced by the narrowed scope (no TOML writer needed: Python 3.10 has none)
"$PYTHON" - "${MUTATE:-}" "${TESTS:-}" <<'PY'
import json, re, sys
text = open("pyproject.toml").read()
for key, value in (("only_mutate", sys.argv[1]), ("pytest_add_cli_args_test_selection", sys.argv[2])):
    if value.split():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {json.dumps(value.split())}", text)
        assert n == 1, key
open("pyproject.toml", "w").write(text)
PY
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # tiny tensors: one thread is faster, and the box is shared
MUTMUT="$(dirname "$PYTHON")/mutmut"
"$MUTMUT" run --max-children "${MUTMUT_CHILDREN:-2}" || true
"$MUTMUT" results --all true > results.txt || true
grep -vE ": killed$" results.txt || true
echo "survivors: $(grep -c ': survived$' results.txt || true) of $(grep -c ': ' results.txt || true) mutants; by status:"
awk -F': ' '{print $NF}' results.txt | sort | uniq -c
echo "details: $WORK/results.txt; show one: cd $WORK && $MUTMUT show NAME"
