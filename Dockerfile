# syntax=docker/dockerfile:1
#
# dlq-bridge container image: a static binary in an empty (scratch) image.
#
#   docker build -t dlq-bridge .                       # full build (needs a registry for rust:RUST_VERSION-bookworm)
#   docker build --build-arg FEATURES=sqs,k8s -t dlq-bridge:sqs .
#       # only the backends a deployment uses: a smaller binary and a smaller
#       # sidecar (README, "Smaller builds"); FEATURES is a cargo feature list
#   docker build --target runtime-prebuilt -t dlq-bridge CONTEXT
#       # final stage only, from a prebuilt static binary: CONTEXT holds
#       # `dlq-bridge`, `ca-certificates.crt`, an empty `var/lib/dlq-bridge/` and
#       # `rootfs/tmp/` of mode 1777 (scripts/image.sh prepares it).
#
# The binary is static (gnu target with +crt-static, OpenSSL linked statically),
# runs as 65532:65532, needs no shell and no writable root filesystem: state goes
# to /var/lib/dlq-bridge (mount a volume there) and temporary files to /tmp.

# The toolchain the project is built and tested with (CI's): a moving tag
# would change the compiler under a rebuild of the same commit. Cargo.toml's
# rust-version is the oldest it claims to build with.
ARG RUST_VERSION=1.95.0

FROM rust:${RUST_VERSION}-bookworm AS builder
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libssl-dev provides libssl.a/libcrypto.a for openssl-sys (OPENSSL_STATIC=1).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends libssl-dev pkg-config ca-certificates \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# Empty: every backend (the crate's default features).
ARG FEATURES=""
ENV OPENSSL_STATIC=1 \
    RUSTFLAGS="-C target-feature=+crt-static" \
    CARGO_TARGET_DIR=/src/target
# The builder's own triple: `docker buildx build --platform linux/arm64` builds
# an aarch64 image (Graviton, Ampere, T2A), linux/amd64 an x86_64 one. --target
# keeps RUSTFLAGS away from build scripts and proc macros.
RUN target="$(rustc -vV | sed -n 's/^host: //p')" \
    && cargo build --release --locked --target "$target" --bin dlq-bridge \
        ${FEATURES:+--no-default-features --features "$FEATURES"} \
    && install -D -m 0755 "target/$target/release/dlq-bridge" /out/dlq-bridge \
    && install -D -m 0644 /etc/ssl/certs/ca-certificates.crt /out/ca-certificates.crt \
    && /out/dlq-bridge --version
# scratch has no directories: serve, as 65532, creates $XDG_STATE_HOME/dlq-bridge,
# so /var/lib/dlq-bridge must exist and be 65532's, also as the mount point of
# a new named volume (which takes the image directory's owner). COPY copies
# what is inside the directory it is given and creates the destination as
# root's (or --chown's) with mode 0755, so /tmp (1777) comes inside rootfs/.
RUN install -d -o 65532 -g 65532 -m 0755 /out/var/lib/dlq-bridge \
    && install -d -m 1777 /out/rootfs/tmp

# Final stage from a binary built outside (CI, scripts/image.sh): no registry needed.
FROM scratch AS runtime-prebuilt
COPY ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY dlq-bridge /dlq-bridge
COPY rootfs/ /
COPY --chown=65532:65532 var/lib/dlq-bridge/ /var/lib/dlq-bridge/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    XDG_STATE_HOME=/var/lib/dlq-bridge \
    HOME=/tmp
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/dlq-bridge"]
CMD ["serve", "--config", "/etc/dlq-bridge/config.yaml"]

# Default target: the same final stage, from the builder above.
FROM scratch AS runtime
COPY --from=builder /out/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt
COPY --from=builder /out/dlq-bridge /dlq-bridge
COPY --from=builder /out/rootfs/ /
COPY --from=builder --chown=65532:65532 /out/var/lib/dlq-bridge/ /var/lib/dlq-bridge/
ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt \
    XDG_STATE_HOME=/var/lib/dlq-bridge \
    HOME=/tmp
USER 65532:65532
EXPOSE 9090
ENTRYPOINT ["/dlq-bridge"]
CMD ["serve", "--config", "/etc/dlq-bridge/config.yaml"]
