#!/usr/bin/env bash
# One-time set-up on a fresh machine: data packages, torch (CPU wheel on CPU machines, an existing CUDA build is
# kept), then this package with its test extra. Safe to run again: everything already present is skipped.
set -euo pipefail
cd "$(dirname "$0")"
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist) >/dev/null
fi
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test,dinov2]"
