#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs and starts what the tests
# need (emulators, Python packages, Rust components), then runs cargo fmt,
# clippy and every test. CI runs exactly this (.ci/run).
#
#   scripts/test.sh            everything
#   SKIP_LINT=1 scripts/test.sh   tests only (local iteration)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# Build outputs live outside the clone so CI reuses them across fresh clones.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$HOME/.cache/dlq-bridge/target}
export CARGO_TERM_COLOR=${CARGO_TERM_COLOR:-never}

step() { printf '\n=== %s\n' "$*"; }

step "toolchain"
for component in rustfmt clippy; do
  rustup component list --installed 2>/dev/null | grep -q "^$component" || rustup component add "$component"
done
python3 -c 'import boto3' 2>/dev/null || PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet boto3
python3 -c 'import ministack' 2>/dev/null || PIP_ROOT_USER_ACTION=ignore python3 -m pip install --quiet "ministack==1.5.33"

step "emulators"
# Stop at the end only what this run started: emulators or an API server already
# running (another run's, `demo.sh --keep`'s) are left as they were.
started=()
running=$(scripts/emulators.sh status)
for e in sqs pubsub servicebus; do
  grep -q "^$e: running" <<<"$running" || started+=("$e")
done
STARTED_KUBE=0
cleanup() {
  if [[ ${#started[@]} -gt 0 ]]; then scripts/emulators.sh stop "${started[@]}" || true; fi
  if [[ $STARTED_KUBE == 1 ]]; then scripts/kube.sh stop >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT
scripts/emulators.sh start
emulators_env=$(scripts/emulators.sh env)
eval "$emulators_env"

step "Kubernetes API server (leader election and chart tests), Chromium (dashboard tests)"
scripts/tools.sh
# tests/dashboard.rs needs them; a missing browser fails the run here, never skips.
scripts/tools.sh browser
scripts/kube.sh status || STARTED_KUBE=1
kube_env=$(scripts/kube.sh start)  # an assignment passes on its status; eval "$(…)" would not
eval "$kube_env"
export DLQ_BRIDGE_TEST_KUBECONFIG=$KUBECONFIG
unset KUBECONFIG

if [[ -z ${SKIP_LINT:-} ]]; then
  step "layers: no import circle, no import running upward (scripts/check-layers.py)"
  python3 scripts/check-layers.py
  step "cargo fmt --check"
  cargo fmt --all -- --check
  step "cargo clippy"
  cargo clippy --workspace --all-targets --features dlq-bridge/fuzzing -- -D warnings
  step "each backend builds alone, without warnings"
  for feature in sqs pubsub servicebus k8s; do
    cargo clippy --quiet --no-default-features --features "$feature" -- -D warnings
  done
fi

step "cargo test"
# The Service Bus emulator started above owns port 5672 (azservicebus always
# dials 5672). The emulator crate's own tests bind 5672 themselves, so they run
# in emulators/servicebus/tests/run.sh below, after ours have released it.
# `fuzzing` adds the fuzz entry points that tests/fuzz_corpus.rs replays.
# On a failure, what the emulators logged (warnings and errors) goes with it.
cargo test --workspace --exclude servicebus-emulator --features dlq-bridge/fuzzing --no-fail-fast ||
  { status=$?; scripts/emulators.sh logs; exit "$status"; }
# Even one this run did not start: the next steps need port 5672.
scripts/emulators.sh stop servicebus

step "Service Bus emulator against Microsoft's SDK (emulators/servicebus/tests/run.sh)"
"$ROOT/emulators/servicebus/tests/run.sh"

step "image and chart (scripts/test-chart.sh)"
"$ROOT/scripts/test-chart.sh"

# Last, so that the release build and the emulators it starts (its Service Bus
# emulator needs port 5672, released above) never overlap with the tests. The
# figures are printed, never judged: this only proves the benchmark still runs.
step "benchmarks, quick mode (bench/run.sh --quick)"
"$ROOT/bench/run.sh" --quick


step "all tests passed"
