#!/usr/bin/env bash
# Build the container image from a prebuilt static binary and smoke-test it.
#
#   scripts/image.sh            build binary + image, run --version, check and serve
#                               (state on a named volume), print size
#   scripts/image.sh binary     only build the static binary (prints its path)
#
# No registry is reachable here, so the Dockerfile's `runtime-prebuilt` target is
# built with podman (buildah) from a context holding the static binary and the
# host's CA bundle. The image runs read-only, as 65532, with runc.
#   IMAGE (default localhost/dlq-bridge:dev)
#   FEATURES (default: every backend) cargo features of a smaller build, e.g. sqs,k8s
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
IMAGE=${IMAGE:-localhost/dlq-bridge:dev}
FEATURES=${FEATURES:-}
# The host's own triple (x86_64 or aarch64 Linux): the image is for the
# machine's architecture, as the Dockerfile's builder stage builds for its own.
TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

log() { echo "image.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

target_dir() {
  # Honour CARGO_TARGET_DIR and cargo's config (build.target-dir).
  cargo metadata --format-version 1 --no-deps 2>/dev/null |
    python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])'
}

build_binary() {
  log "building static release binary ($TRIPLE, +crt-static, OpenSSL static${FEATURES:+, features $FEATURES})"
  # libssl-dev gives openssl-sys its static archives (pulled by the Service Bus backend).
  if ! dpkg-query -W -f='${Status}' libssl-dev 2>/dev/null | grep -q "install ok installed"; then
    apt-get update -qq >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libssl-dev pkg-config >/dev/null
  fi
  rustup target list --installed 2>/dev/null | grep -qx "$TRIPLE" || rustup target add "$TRIPLE" >&2 || true
  # --target keeps RUSTFLAGS away from build scripts and proc macros (host code).
  OPENSSL_STATIC=1 RUSTFLAGS="-C target-feature=+crt-static" \
    nice -n 10 cargo build --release --locked --target "$TRIPLE" --bin dlq-bridge \
      ${FEATURES:+--no-default-features --features "$FEATURES"} >&2 ||
    die "static release build failed (see the cargo output above)"
  local bin
  bin="$(target_dir)/$TRIPLE/release/dlq-bridge"
  [ -x "$bin" ] || die "no binary at $bin"
  if file "$bin" | grep -q 'dynamically linked'; then
    die "$bin is dynamically linked: $(file -b "$bin")"
  fi
  echo "$bin"
}

PODMAN_RUN_OPTS=(--runtime runc --ulimit nofile=1024:1024 --ulimit nproc=1024:1024
  --read-only --user 65532:65532 --network host)
podman_run() {
  podman run --rm "${PODMAN_RUN_OPTS[@]}" "$@"
}

CTX=""
STARTED_SQS=0
SERVE_CTR=""
STATE_VOLUME=""
cleanup() {
  [ -n "$CTX" ] && rm -rf "$CTX"
  if [ -n "$SERVE_CTR" ]; then podman rm -f "$SERVE_CTR" >/dev/null 2>&1 || true; fi
  if [ -n "$STATE_VOLUME" ]; then podman volume rm -f "$STATE_VOLUME" >/dev/null 2>&1 || true; fi
  if [ "$STARTED_SQS" = 1 ]; then "$ROOT/scripts/emulators.sh" stop sqs >/dev/null 2>&1 || true; fi
}
trap cleanup EXIT

main() {
  local bin
  bin=$(build_binary)
  [ "${1:-}" = binary ] && { echo "$bin"; return 0; }
  command -v podman >/dev/null || "$ROOT/scripts/tools.sh"

  CTX=$(mktemp -d)
  local ctx=$CTX
  cp "$bin" "$ctx/dlq-bridge"
  cp /etc/ssl/certs/ca-certificates.crt "$ctx/ca-certificates.crt"
  # The image's only directories (see the Dockerfile's runtime-prebuilt stage).
  mkdir -p "$ctx/var/lib/dlq-bridge" "$ctx/rootfs/tmp"
  chmod 1777 "$ctx/rootfs/tmp"
  log "building $IMAGE (target runtime-prebuilt) with podman"
  podman build --quiet --target runtime-prebuilt -f "$ROOT/Dockerfile" -t "$IMAGE" "$ctx" >/dev/null

  log "smoke test: --version"
  podman_run "$IMAGE" --version

  if [ -n "$FEATURES" ] && [[ ",$FEATURES," != *,sqs,* ]]; then
    log "smoke test: check skipped (this build has no SQS backend)"
    report_size "$bin"
    return 0
  fi
  # A config with one SQS queue against moto on the host network.
  "$ROOT/scripts/emulators.sh" status 2>/dev/null | grep -q '^sqs: running' || STARTED_SQS=1
  "$ROOT/scripts/emulators.sh" start sqs >&2
  eval "$("$ROOT/scripts/emulators.sh" env sqs)"
  local queue="dlq-bridge-image-smoke-dlq"
  python3 - "$AWS_ENDPOINT_URL_SQS" "$queue" <<'PY'
import sys, urllib.parse, urllib.request
endpoint, queue = sys.argv[1], sys.argv[2]
data = urllib.parse.urlencode({"Action": "CreateQueue", "QueueName": queue, "Version": "2012-11-05"}).encode()
req = urllib.request.Request(endpoint + "/", data=data, headers={
    "Authorization": "AWS4-HMAC-SHA256 Credential=test/20240101/us-east-1/sqs/aws4_request, SignedHeaders=host, Signature=x"})
urllib.request.urlopen(req, timeout=10).read()
PY
  mkdir -p "$ctx/config"
  cat >"$ctx/config/config.yaml" <<YAML
queues:
  - name: smoke
    sqs:
      queue: $queue
      region: us-east-1
      endpoint_url: $AWS_ENDPOINT_URL_SQS
YAML
  chmod -R a+rX "$ctx/config"
  log "smoke test: check --config /config/config.yaml (SQS on moto at $AWS_ENDPOINT_URL_SQS)"
  podman_run -v "$ctx/config:/config:ro" \
    -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test -e AWS_REGION=us-east-1 \
    "$IMAGE" check --config /config/config.yaml

  # A new named volume takes the owner of the image's mount point: serve, as
  # 65532, must be able to create its state directory there.
  log "smoke test: serve with a named volume at /var/lib/dlq-bridge"
  STATE_VOLUME="dlq-bridge-image-smoke-$$"
  SERVE_CTR="dlq-bridge-image-smoke-$$"
  podman volume create "$STATE_VOLUME" >/dev/null
  # Port 0: serve prints the address it bound; the host network may have 9090 taken.
  podman run -d --name "$SERVE_CTR" "${PODMAN_RUN_OPTS[@]}" \
    -v "$ctx/config:/config:ro" -v "$STATE_VOLUME:/var/lib/dlq-bridge" \
    -e AWS_ACCESS_KEY_ID=test -e AWS_SECRET_ACCESS_KEY=test -e AWS_REGION=us-east-1 \
    -e DLQ_BRIDGE__SERVE__LISTEN=127.0.0.1:0 \
    "$IMAGE" serve --config /config/config.yaml >/dev/null
  local deadline=$((SECONDS + 60))
  # serve says it listens only once its data directory is locked and its journal open.
  # Not grep -q: with pipefail, podman logs cut off by an early exit fails the pipe.
  until podman logs "$SERVE_CTR" 2>&1 | grep 'listening on' >/dev/null; do
    if [ "$(podman inspect --format '{{.State.Running}}' "$SERVE_CTR")" != true ] || ((SECONDS >= deadline)); then
      podman logs "$SERVE_CTR" >&2 2>&1 || true
      die "serve did not start with a named volume at /var/lib/dlq-bridge (its output is above)"
    fi
    sleep 0.5
  done
  podman stop -t 10 "$SERVE_CTR" >/dev/null
  local mountpoint
  mountpoint=$(podman volume inspect --format '{{.Mountpoint}}' "$STATE_VOLUME")
  [ -d "$mountpoint/dlq-bridge" ] || die "serve left no state directory in the volume ($mountpoint)"
  log "smoke test: serve created $(stat -c '%U:%G' "$mountpoint/dlq-bridge") dlq-bridge/ in the volume"

  report_size "$bin"
}

report_size() {
  local size
  size=$(podman image inspect --format '{{.Size}}' "$IMAGE")
  echo "image $IMAGE: $size bytes ($((size / 1024 / 1024)) MiB); binary $(stat -c %s "$1") bytes"
}
main "$@"
