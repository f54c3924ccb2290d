#!/usr/bin/env bash
# Conformance suites of servicebus-emulator: the Rust flows (azservicebus
# 0.25.1) and the Python flows (Microsoft's azure-servicebus 7.15.0).
# Exits non-zero on any failure. scripts/test.sh calls this.
#
# Environment:
#   CARGO_TARGET_DIR               honoured for the build
#   SERVICEBUS_VENV                venv for the Python SDK (default: ~/.cache/dlq-bridge/servicebus-venv)
#   SERVICEBUS_CONNECTION_STRING   run the Python flows against a real namespace or
#                                  Microsoft's emulator instead (entities: tests/topology.yaml)
set -euo pipefail

tests_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
manifest="$tests_dir/../Cargo.toml"
venv=${SERVICEBUS_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/dlq-bridge/servicebus-venv}
sdk_version=7.15.0

if ! "$venv/bin/python" -c "import azure.servicebus as sb, pytest; assert sb.__version__ == '$sdk_version'" 2>/dev/null; then
    echo "==> installing azure-servicebus==$sdk_version and pytest into $venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check "azure-servicebus==$sdk_version" pytest
fi

echo "==> building servicebus-emulator"
cargo build --quiet -p servicebus-emulator --manifest-path "$manifest"
target_dir=$(cargo metadata --format-version 1 --no-deps --manifest-path "$manifest" |
    "$venv/bin/python" -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')
export SERVICEBUS_EMULATOR_BIN="$target_dir/debug/servicebus-emulator"

if [[ -n "${SERVICEBUS_CONNECTION_STRING:-}" ]]; then
    echo "==> SERVICEBUS_CONNECTION_STRING is set: the Rust flows need the emulator on port 5672 and do not run"
else
    echo "==> Rust flows (azservicebus), serial: azservicebus always dials 127.0.0.1:5672"
    cargo test --quiet -p servicebus-emulator --manifest-path "$manifest" -- --test-threads=1
fi

echo "==> Python flows (azure-servicebus $sdk_version)"
"$venv/bin/python" -m pytest -q -p no:cacheprovider "$tests_dir/python"
