#!/usr/bin/env bash
# A real Kubernetes API server (no kubelet: pods never run) for chart tests.
#
#   scripts/kube.sh start   start etcd + kube-apiserver on free loopback ports (idempotent)
#   scripts/kube.sh stop    stop them and remove the state
#   scripts/kube.sh env     print `export KUBECONFIG=...`
#   scripts/kube.sh status  exit 0 when they run and answer (what `start` leaves alone)
#   eval "$(scripts/kube.sh start)"
#
# kube-apiserver v1.20.2 (built from Debian's source by scripts/tools.sh) and
# Debian's etcd. Authentication: a static token file with an admin token in
# system:masters, plus ServiceAccount tokens (`kubectl create token`) signed with a
# key pair made here. Authorization: RBAC. The ServiceAccount admission plugin is
# off (it would wait for token controllers that only kube-controller-manager runs).
# State: DLQ_BRIDGE_KUBE_STATE (default $TMPDIR/dlq-bridge-kube, else /tmp/...).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STATE=${DLQ_BRIDGE_KUBE_STATE:-${TMPDIR:-/tmp}/dlq-bridge-kube}
KUBECONFIG_FILE="$STATE/kubeconfig"

log() { echo "kube.sh: $*" >&2; }
die() { log "error: $*"; exit 1; }

tools_env() { eval "$("$ROOT/scripts/tools.sh" env)"; }

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

alive() { [ -f "$STATE/$1.pid" ] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

apiserver_ready() {
  [ -f "$STATE/apiserver.port" ] || return 1
  curl -fsS --max-time 2 --cacert "$STATE/pki/ca.crt" -H "Authorization: Bearer $(cat "$STATE/admin.token")" \
    "https://127.0.0.1:$(cat "$STATE/apiserver.port")/readyz" >/dev/null 2>&1
}

etcd_ready() { curl -fsS --max-time 2 -o /dev/null "http://127.0.0.1:$1/health" 2>/dev/null; }

print_env() { echo "export KUBECONFIG=$KUBECONFIG_FILE"; }

wait_for() { # wait_for NAME SECONDS CHECK...
  local name=$1 secs=$2; shift 2
  local deadline=$((SECONDS + secs))
  until "$@"; do
    alive "$name" || die "$name exited; log: $STATE/$name.log: $(tail -n 5 "$STATE/$name.log" | tr '\n' ' ')"
    ((SECONDS < deadline)) || die "$name not ready after ${secs}s; log: $STATE/$name.log"
    sleep 0.5
  done
}

make_pki() {
  local pki="$STATE/pki"
  mkdir -p "$pki"
  # Reused while both certificates stay valid for another day (they last 30):
  # a state directory kept across runs would otherwise serve an expired one.
  if [ -f "$pki/apiserver.crt" ] && [ -f "$pki/sa.key" ] &&
    openssl x509 -checkend 86400 -noout -in "$pki/ca.crt" >/dev/null 2>&1 &&
    openssl x509 -checkend 86400 -noout -in "$pki/apiserver.crt" >/dev/null 2>&1; then
    return 0
  fi
  openssl req -x509 -newkey rsa:2048 -nodes -days 30 -subj "/CN=dlq-bridge-test-ca" \
    -keyout "$pki/ca.key" -out "$pki/ca.crt" 2>/dev/null
  openssl req -newkey rsa:2048 -nodes -subj "/CN=kube-apiserver" \
    -keyout "$pki/apiserver.key" -out "$pki/apiserver.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1,DNS:localhost,DNS:kubernetes.default.svc\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$pki/ext.cnf"
  openssl x509 -req -in "$pki/apiserver.csr" -CA "$pki/ca.crt" -CAkey "$pki/ca.key" -CAcreateserial \
    -days 30 -extfile "$pki/ext.cnf" -out "$pki/apiserver.crt" 2>/dev/null
  # ServiceAccount token signing key pair.
  openssl genrsa -out "$pki/sa.key" 2048 2>/dev/null
  openssl rsa -in "$pki/sa.key" -pubout -out "$pki/sa.pub" 2>/dev/null
}

start() {
  if alive etcd && alive apiserver && apiserver_ready; then print_env; return 0; fi
  stop_quiet
  tools_env
  command -v kube-apiserver >/dev/null || "$ROOT/scripts/tools.sh" >&2
  command -v etcd >/dev/null || die "etcd not found (scripts/tools.sh installs etcd-server)"
  mkdir -p "$STATE"
  make_pki
  local token etcd_port peer_port api_port
  token=$(openssl rand -hex 24)
  echo "$token" >"$STATE/admin.token"
  echo "$token,admin,admin,system:masters" >"$STATE/tokens.csv"
  etcd_port=$(free_port); peer_port=$(free_port); api_port=$(free_port)
  while [ "$peer_port" = "$etcd_port" ]; do peer_port=$(free_port); done
  while [ "$api_port" = "$etcd_port" ] || [ "$api_port" = "$peer_port" ]; do api_port=$(free_port); done
  echo "$api_port" >"$STATE/apiserver.port"

  setsid etcd --name dlq-bridge-test --data-dir "$STATE/etcd-data" \
    --listen-client-urls "http://127.0.0.1:$etcd_port" --advertise-client-urls "http://127.0.0.1:$etcd_port" \
    --listen-peer-urls "http://127.0.0.1:$peer_port" --initial-advertise-peer-urls "http://127.0.0.1:$peer_port" \
    --initial-cluster "dlq-bridge-test=http://127.0.0.1:$peer_port" --log-level warn \
    </dev/null >"$STATE/etcd.log" 2>&1 &
  echo $! >"$STATE/etcd.pid"
  wait_for etcd 30 etcd_ready "$etcd_port"

  setsid kube-apiserver \
    --etcd-servers "http://127.0.0.1:$etcd_port" \
    --bind-address 127.0.0.1 --advertise-address 127.0.0.1 --secure-port "$api_port" \
    --tls-cert-file "$STATE/pki/apiserver.crt" --tls-private-key-file "$STATE/pki/apiserver.key" \
    --client-ca-file "$STATE/pki/ca.crt" \
    --token-auth-file "$STATE/tokens.csv" \
    --authorization-mode RBAC \
    --service-account-key-file "$STATE/pki/sa.pub" \
    --service-account-signing-key-file "$STATE/pki/sa.key" \
    --service-account-issuer https://kubernetes.default.svc.cluster.local \
    --api-audiences https://kubernetes.default.svc.cluster.local \
    --disable-admission-plugins ServiceAccount \
    --service-cluster-ip-range 10.96.0.0/16 \
    --allow-privileged=false \
    </dev/null >"$STATE/apiserver.log" 2>&1 &
  echo $! >"$STATE/apiserver.pid"
  wait_for apiserver 90 apiserver_ready

  local server="https://127.0.0.1:$api_port"
  cat >"$KUBECONFIG_FILE" <<YAML
apiVersion: v1
kind: Config
clusters:
- name: dlq-bridge-test
  cluster:
    server: $server
    certificate-authority-data: $(base64 -w0 "$STATE/pki/ca.crt")
users:
- name: admin
  user:
    token: $token
contexts:
- name: dlq-bridge-test
  context: {cluster: dlq-bridge-test, user: admin, namespace: default}
current-context: dlq-bridge-test
YAML
  chmod 600 "$KUBECONFIG_FILE"
  # The default namespace and RBAC bootstrap roles appear shortly after /readyz.
  local deadline=$((SECONDS + 60))
  until KUBECONFIG="$KUBECONFIG_FILE" kubectl get namespace default >/dev/null 2>&1; do
    ((SECONDS < deadline)) || die "namespace default never appeared"
    sleep 0.5
  done
  log "kube-apiserver $(kube-apiserver --version | awk '{print $2}') ready at $server (state $STATE)"
  print_env
}

stop_quiet() {
  local name
  for name in apiserver etcd; do
    if alive "$name"; then
      local pid
      pid=$(cat "$STATE/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$STATE/$name.pid"
  done
}

stop() {
  stop_quiet
  rm -rf "$STATE"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  env) [ -f "$KUBECONFIG_FILE" ] || die "not started (scripts/kube.sh start)"; print_env ;;
  status) alive etcd && alive apiserver && apiserver_ready ;;
  *) echo "usage: $0 start|stop|env|status" >&2; exit 2 ;;
esac
