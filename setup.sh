#!/usr/bin/env bash
# One-time set-up on a fresh machine: Debian packages (Fashion-MNIST for the tests, headless Chromium for the report's
# render test), torch (CPU wheel on CPU machines, an existing CUDA build is kept), then this package with its test
# and tensorboard extras. Safe to run again: everything already present is skipped.
set -euo pipefail
cd "$(dirname "$0")"
missing=()
[ -d /usr/share/datasets/fashion-mnist ] || missing+=(dataset-fashion-mnist)
command -v chromium >/dev/null || missing+=(chromium)
if [ ${#missing[@]} -gt 0 ] && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}") >/dev/null
fi
python -c "import torch" 2>/dev/null || pip install -q torch==2.13.0
pip install -q -e ".[test,dinov2,tensorboard,lora]"
