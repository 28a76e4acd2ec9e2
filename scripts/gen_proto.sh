#!/usr/bin/env bash
# Regenerate node/_gen/ from proto/ (Python modules + .pyi stubs). Usage: gen_proto.sh [OUT_DIR]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$here/node/_gen}
python=${PYTHON:-python3}
# protoc finds the mypy plugins on PATH, next to the interpreter.
export PATH="$(dirname "$(command -v "$python")"):$PATH"
rm -rf "$out/filch"
mkdir -p "$out"
"$python" -m grpc_tools.protoc -I "$here/proto" \
  --python_out="$out" --mypy_out="$out" \
  --grpc_python_out="$out" --mypy_grpc_out="$out" \
  "$here"/proto/filch/v1/*.proto
# protoc writes imports relative to proto/; make them package-absolute.
find "$out/filch" -name '*.py' -o -name '*.pyi' | xargs sed -i -E 's/^from filch\.v1 import/from node._gen.filch.v1 import/; s/^import filch\.v1\./import node._gen.filch.v1./'
touch "$out/__init__.py" "$out/filch/__init__.py" "$out/filch/v1/__init__.py"
