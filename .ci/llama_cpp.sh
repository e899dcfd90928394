#!/usr/bin/env bash
# Install llama-cpp-python (the GGUF tests' llama.cpp) into .venv as a PORTABLE build, or leave it out.
#
# Baseline: no native tuning (GGML_NATIVE=OFF) and a fixed x86-64 instruction set that every x86 machine of the last
# ten years runs: AVX, AVX2, FMA, F16C, BMI2, SSE4.2 (x86-64-v3: Intel Haswell 2013+, AMD Zen 2017+), with every
# AVX512*, AVX-VNNI and AMX* option OFF. Why: a native build takes the build machine's instruction sets; on an
# Intel AMX machine llama.cpp's q8_0 path then used AVX512/AMX code and a machine without them (or a wheel reused
# on another machine) died with SIGILL, taking the whole pytest process with it. On aarch64 (and any other
# architecture): GGML_NATIVE=OFF only, the compiler's generic baseline.
#
# pip's wheel cache keys a built wheel on the package version only, not on CMAKE_ARGS, so a machine that once built
# a native wheel would silently reuse it. So: build with `pip wheel --no-cache-dir` into our own wheel directory
# named by a hash of version + flags, install from there, and mark the venv (.venv/.llama-cpp-<hash>); a llama_cpp
# without our marker (built some other way) is reinstalled, not trusted. Afterwards llama_cpp is either this build,
# checked with llama_print_system_info() (no AVX512/AMX on x86), or not installed; exit status 1 means not installed.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION=0.3.36
VENV=${VENV:-.venv}
PY=$VENV/bin/python
ARCH=$(uname -m)
COMMON="-DLLAVA_BUILD=OFF -DLLAMA_OPENSSL=OFF"
case "$ARCH" in
  x86_64|amd64)
    FLAGS="-DGGML_NATIVE=OFF -DGGML_SSE42=ON -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_BMI2=ON -DGGML_FMA=ON -DGGML_F16C=ON"
    FLAGS+=" -DGGML_AVX_VNNI=OFF -DGGML_AVX512=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_VNNI=OFF"
    FLAGS+=" -DGGML_AVX512_BF16=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF $COMMON" ;;
  *) FLAGS="-DGGML_NATIVE=OFF $COMMON" ;;
esac
HASH=$(printf '%s|%s|%s' "$VERSION" "$ARCH" "$FLAGS" | sha256sum | cut -c1-12)
WHEELS=${XDG_CACHE_HOME:-$HOME/.cache}/tinystories/wheels/llama-cpp-python-$VERSION-$HASH
MARKER=$VENV/.llama-cpp-$HASH

system_info() {  # in a child: prints llama.cpp's compiled-in CPU features; fails on AVX512/AMX (x86) or a crash
  "$PY" - "$ARCH" <<'EOF'
import re, sys
import llama_cpp
line = llama_cpp.llama_print_system_info().decode().strip()
print("llama_print_system_info():", line, flush=True)
on = {k for k, v in re.findall(r"([A-Z0-9_]+) = (\d+)", line) if v != "0"}
bad = sorted(k for k in on if k.startswith(("AVX512", "AMX", "AVX_VNNI")))
if sys.argv[1] in ("x86_64", "amd64") and (bad or "AVX2" not in on):
    sys.exit(f"not the portable baseline: {', '.join(bad) or 'no AVX2'} compiled in")
EOF
}

if [ -e "$MARKER" ] && system_info; then
  echo "llama-cpp-python $VERSION: the portable build ($HASH) is installed"
  exit 0
fi
if "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llama_cpp') is None)"; then
  echo "llama_cpp in $VENV is not marked as this build ($HASH): reinstalling it, not trusting it"
fi
rm -f "$VENV"/.llama-cpp-*
if ! ls "$WHEELS"/llama_cpp_python-"$VERSION"-*.whl >/dev/null 2>&1 || \
   ! "$PY" -m pip install -q --no-index --find-links "$WHEELS" --force-reinstall --no-deps \
     "llama-cpp-python==$VERSION" 2>/dev/null; then
  echo "building llama-cpp-python $VERSION from source (portable: $FLAGS) into $WHEELS"
  mkdir -p "$WHEELS"
  start=$SECONDS
  if ! CMAKE_ARGS="$FLAGS" CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)} \
       "$PY" -m pip wheel -q --no-cache-dir --no-deps -w "$WHEELS" "llama-cpp-python==$VERSION"; then
    echo "llama-cpp-python build failed after $((SECONDS - start)) s"
    "$PY" -m pip uninstall -q -y llama-cpp-python 2>/dev/null || true  # none of unknown build stays
    exit 1
  fi
  echo "llama-cpp-python $VERSION built in $((SECONDS - start)) s ($(nproc) cores)"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" --force-reinstall --no-deps "llama-cpp-python==$VERSION"
fi
"$PY" -m pip install -q "llama-cpp-python==$VERSION"  # its dependencies (numpy, jinja2, diskcache, ...); no rebuild
if ! system_info; then
  "$PY" -m pip uninstall -q -y llama-cpp-python
  exit 1
fi
touch "$MARKER"
echo "llama-cpp-python $VERSION: the portable build ($HASH) is installed"
