#!/usr/bin/env sh
# Regenerate python/src/vcid/v1/*_pb2*.py from proto/ (see generate_stubs.py).
exec "${PYTHON:-python3}" "$(dirname "$0")/generate_stubs.py" "$@"
