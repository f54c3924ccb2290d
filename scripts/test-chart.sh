#!/usr/bin/env bash
# Checks of the container image recipe and the Helm chart (issue 7). Called by
# scripts/test.sh; runs alone too. Installs its tools (scripts/tools.sh), starts a
# real kube-apiserver (scripts/kube.sh) and stops it again if it started it.
#
#   0. hadolint on the Dockerfile, yamllint on the chart's values and test values
#   1. helm lint --strict
#   2. helm template for each mode | kubernetes-validate --strict -k 1.30.0
#   3. value variations, asserted on deserialised objects (pytest tests/chart)
#   4. bad values rejected by the schema and the chart's checks (pytest)
#   5. helm install (and upgrade) into the real kube-apiserver
#   6. RBAC with the chart ServiceAccount's own token: leases yes, secrets no
#   7. check_leader_election: `dlq-bridge serve`, run as a host process with that
#      token and the chart's rendered config, elects itself leader (Lease holder)
#
# Step 7 needs `dlq-bridge serve` (issue 6). DLQ_BRIDGE_LEADER_ELECTION_CHECK:
#   required  (default) the step must run and pass (fails when `serve` is missing)
#   auto      runs when the binary has `serve`; otherwise prints a loud NOT RUN
#             notice (for bisecting old commits)
# Any failure exits non-zero.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHART=$ROOT/charts/dlq-bridge
K8S_SCHEMA_VERSION=1.30.0
LEADER_ELECTION_CHECK=${DLQ_BRIDGE_LEADER_ELECTION_CHECK:-required}

step() { printf '\n=== chart: %s\n' "$*"; }
die() { echo "test-chart.sh: FAILED: $*" >&2; exit 1; }

WORK=$(mktemp -d)
STARTED_KUBE=0
SERVE_PID=""
cleanup() {
  if [ -n "$SERVE_PID" ]; then kill "$SERVE_PID" 2>/dev/null || true; wait "$SERVE_PID" 2>/dev/null || true; fi
  if [ "$STARTED_KUBE" = 1 ]; then "$ROOT/scripts/kube.sh" stop || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

dlq_bridge_bin() {
  if [ -n "${DLQ_BRIDGE_BIN:-}" ]; then echo "$DLQ_BRIDGE_BIN"; return; fi
  cargo build --quiet --bin dlq-bridge >&2
  local dir
  dir=$(cargo metadata --format-version 1 --no-deps | python -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
  echo "$dir/debug/dlq-bridge"
}

step "tools"
t0=$SECONDS
"$ROOT/scripts/tools.sh"
eval "$("$ROOT/scripts/tools.sh" env)"
echo "tools ready in $((SECONDS - t0))s (cache $DLQ_BRIDGE_TOOLS)"

# ---------------------------------------------------------------- 0. linters
step "hadolint Dockerfile"
hadolint "$ROOT/Dockerfile"
step "yamllint values"
yamllint -s -c "$ROOT/tests/chart/yamllint.yaml" "$CHART/values.yaml" "$CHART/Chart.yaml" \
  "$ROOT/tests/chart/fixtures/app-with-sidecar/values.yaml" "$ROOT/tests/chart/values"

# ---------------------------------------------------------------- 1. lint
step "helm lint --strict"
helm lint --strict "$CHART" --set auth.existingSecret=dlq-bridge-token
for f in "$ROOT"/tests/chart/values/*.yaml; do
  helm lint --strict --quiet "$CHART" -f "$f" >/dev/null || { helm lint --strict "$CHART" -f "$f"; die "helm lint with $f"; }
done

# ---------------------------------------------------------------- 2. schemas
step "helm template | kubernetes-validate --strict -k $K8S_SCHEMA_VERSION"
PARENT=$WORK/app-with-sidecar
cp -r "$ROOT/tests/chart/fixtures/app-with-sidecar" "$PARENT"
mkdir -p "$PARENT/charts" && cp -r "$CHART" "$PARENT/charts/dlq-bridge"
validate() { # validate NAME helm-template-args...
  local name=$1; shift
  local out="$WORK/rendered-$name.yaml"
  helm template "$@" >"$out"
  local n
  n=$(grep -c '^kind:' "$out" || true)
  kubernetes-validate --strict --quiet -k "$K8S_SCHEMA_VERSION" "$out" ||
    die "kubernetes-validate rejected mode $name ($out)"
  echo "  $name: $n objects valid"
}
# The chart needs a source for the API token; the defaults alone are refused.
if helm template rel "$CHART" -n dlq >/dev/null 2>&1; then die "the chart rendered without any API token source"; fi
validate deployment rel "$CHART" -n dlq --set auth.existingSecret=dlq-bridge-token
for f in "$ROOT"/tests/chart/values/*.yaml; do
  validate "deployment-$(basename "$f" .yaml)" rel "$CHART" -n dlq -f "$f"
done
validate sidecar rel "$CHART" -n dlq --set mode=sidecar --set sidecar.podSelector.app=orders --set auth.generate=true
validate sidecar-native-in-app rel "$PARENT" -n shop
validate sidecar-classic-in-app rel "$PARENT" -n shop --set dlq-bridge.sidecar.native=false

# ---------------------------------------------------------------- 3+4. tests
step "value variations and README examples (pytest tests/chart/test_render.py test_readme.py)"
(cd "$ROOT/tests/chart" && python -m pytest -q -p no:cacheprovider test_render.py test_readme.py)
step "bad values rejected (pytest tests/chart/test_reject.py)"
(cd "$ROOT/tests/chart" && python -m pytest -q -p no:cacheprovider test_reject.py)

step "the rendered configs are accepted by dlq-bridge (pytest tests/chart/test_binary.py)"
DLQ_BRIDGE_BIN=$(dlq_bridge_bin)
export DLQ_BRIDGE_BIN
(cd "$ROOT/tests/chart" && python -m pytest -q -p no:cacheprovider test_binary.py)

# ---------------------------------------------------------------- 5. install
step "helm install into kube-apiserver (scripts/kube.sh)"
if ! "$ROOT/scripts/kube.sh" env >/dev/null 2>&1 || ! KUBECONFIG=$("$ROOT/scripts/kube.sh" env | sed 's/^export KUBECONFIG=//') kubectl get --raw /readyz >/dev/null 2>&1; then
  STARTED_KUBE=1
fi
kube_env=$("$ROOT/scripts/kube.sh" start)  # an assignment passes on its status; eval "$(…)" would not
eval "$kube_env"
kubectl version 2>/dev/null | sed 's/^/  /' || true
NS=dlq-chart-test-$$
REL=dlq
kubectl create namespace "$NS" >/dev/null
# Stand-ins for the Prometheus Operator CRDs, so ServiceMonitor and PrometheusRule install.
kubectl apply -f "$ROOT/tests/chart/fixtures/monitoring-crds.yaml" >/dev/null
kubectl wait --for condition=established --timeout 60s crd/servicemonitors.monitoring.coreos.com crd/prometheusrules.monitoring.coreos.com >/dev/null
helm install "$REL" "$CHART" -n "$NS" -f "$ROOT/tests/chart/values/full.yaml" >/dev/null
FULL=$(helm get manifest "$REL" -n "$NS" | python -c 'import sys,yaml; print(next(d for d in yaml.safe_load_all(sys.stdin) if d and d["kind"]=="Deployment")["metadata"]["name"])')
for obj in "deployment/$FULL" "configmap/$FULL" "service/$FULL" "serviceaccount/$FULL" \
  "secret/$FULL-auth" "role/$FULL-leader-election" "rolebinding/$FULL-leader-election" \
  "persistentvolumeclaim/$FULL-data" "servicemonitor/$FULL" "prometheusrule/$FULL"; do
  kubectl get -n "$NS" "$obj" -o name >/dev/null || die "$obj missing after helm install"
done
echo "  installed release $REL in $NS: $(helm list -n "$NS" -o json | python -c 'import sys,json; r=json.load(sys.stdin)[0]; print(r["status"], "revision", r["revision"])')"
auth_checksum() {
  kubectl get deployment -n "$NS" "$FULL" -o json |
    python -c 'import json,sys; print(json.load(sys.stdin)["spec"]["template"]["metadata"]["annotations"]["checksum/auth"])'
}
TOKEN1=$(kubectl get secret -n "$NS" "$FULL-auth" -o jsonpath='{.data.api-token}')
SUM1=$(auth_checksum)
[ "$SUM1" = "$(printf '%s' "$TOKEN1" | base64 -d | sha256sum | cut -d' ' -f1)" ] ||
  die "the pods' checksum/auth is not that of the generated token"
helm upgrade "$REL" "$CHART" -n "$NS" --reuse-values --set logLevel=debug >/dev/null
TOKEN2=$(kubectl get secret -n "$NS" "$FULL-auth" -o jsonpath='{.data.api-token}')
[ "$TOKEN1" = "$TOKEN2" ] || die "the generated API token changed on helm upgrade"
[ "$SUM1" = "$(auth_checksum)" ] || die "checksum/auth changed on helm upgrade (the pods would restart)"
echo "  helm upgrade kept the generated API token and the pods' checksum/auth"
# The sidecar-mode objects install too (into their own namespace). This API server
# is 1.20: it predates native sidecars (initContainers[].restartPolicy, 1.28+), so
# the app chart goes in with the classic sidecar; the native form was checked
# against the 1.30 schemas in step 2.
kubectl create namespace "$NS-sidecar" >/dev/null
helm install orders "$PARENT" -n "$NS-sidecar" --set dlq-bridge.sidecar.native=false >/dev/null
kubectl get -n "$NS-sidecar" deployment/orders-orders -o jsonpath='{.spec.template.spec.containers[*].name}' |
  grep -qx "orders dlq-bridge" || die "the classic sidecar is not in the app's pod on the API server"
kubectl get -n "$NS-sidecar" configmap/orders-dlq-bridge role/orders-dlq-bridge-leader-election -o name >/dev/null
echo "  app chart with the dlq-bridge sidecar installed in $NS-sidecar"

# ---------------------------------------------------------------- 6. RBAC
step "RBAC as the chart's ServiceAccount (its own token)"
SA_TOKEN=$(kubectl create token "$FULL" -n "$NS" --duration 1h)
SERVER=$(kubectl config view --minify -o jsonpath='{.clusters[0].cluster.server}')
SA_KUBECONFIG=$WORK/sa-kubeconfig
cat >"$SA_KUBECONFIG" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: test
  cluster:
    server: $SERVER
    certificate-authority-data: $(kubectl config view --raw --minify -o jsonpath='{.clusters[0].cluster.certificate-authority-data}')
users:
- name: sa
  user:
    token: $SA_TOKEN
contexts:
- name: sa
  context: {cluster: test, user: sa, namespace: $NS}
current-context: sa
EOF
echo "  as system:serviceaccount:$NS:$FULL"
can() { KUBECONFIG=$SA_KUBECONFIG kubectl auth can-i "$@" 2>/dev/null || true; }
allow() {
  [ "$(can "$@")" = yes ] || die "ServiceAccount cannot $*"
  echo "  can $*: yes"
}
deny() {
  [ "$(can "$@")" = no ] || die "ServiceAccount can $*"
  echo "  can $*: no"
}
# What serve calls: create a Lease, get and replace the chart's own. Nothing
# on other Leases (in sidecar mode the app shares this ServiceAccount).
LEASE=$FULL
allow create leases.coordination.k8s.io -n "$NS"
allow get "leases.coordination.k8s.io/$LEASE" -n "$NS"
allow update "leases.coordination.k8s.io/$LEASE" -n "$NS"
deny get leases.coordination.k8s.io/another-controller -n "$NS"
deny update leases.coordination.k8s.io/another-controller -n "$NS"
deny list leases.coordination.k8s.io -n "$NS"
deny patch "leases.coordination.k8s.io/$LEASE" -n "$NS"
deny get secrets -n "$NS"
deny list secrets -n "$NS"
deny delete leases.coordination.k8s.io -n "$NS"
deny list pods -n "$NS"
deny get configmaps -n "$NS"
deny update deployments.apps -n "$NS"
deny create leases.coordination.k8s.io -n default
deny get secrets -n default
# A real write with the token, not only SubjectAccessReview: create the chart's
# Lease, read it and replace it, as serve does; then remove it (as the admin) so
# that step 7 finds it free.
cat <<EOF | KUBECONFIG=$SA_KUBECONFIG kubectl create -f - >/dev/null
apiVersion: coordination.k8s.io/v1
kind: Lease
metadata: {name: $LEASE, namespace: $NS}
spec: {holderIdentity: rbac-probe, leaseDurationSeconds: 5}
EOF
KUBECONFIG=$SA_KUBECONFIG kubectl get lease "$LEASE" -n "$NS" -o json |
  python -c 'import json,sys; l=json.load(sys.stdin); l["spec"]["holderIdentity"]="replaced"; print(json.dumps(l))' |
  KUBECONFIG=$SA_KUBECONFIG kubectl replace -f - >/dev/null
kubectl delete lease "$LEASE" -n "$NS" >/dev/null
if KUBECONFIG=$SA_KUBECONFIG kubectl get secret "$FULL-auth" -n "$NS" >/dev/null 2>&1; then
  die "ServiceAccount token reads secrets"
fi
echo "  lease create+get+replace with the token: ok; secret read with the token: forbidden"

# ---------------------------------------------------------------- 7. leader election

# `dlq-bridge serve`, with the ConfigMap the chart installed, the ServiceAccount's
# token (KUBECONFIG) and the downward-API variables a pod would have, must take the
# chart's Lease.
check_leader_election() {
  local bin=$1 identity="host-process-$$" port
  kubectl get configmap "$FULL" -n "$NS" -o jsonpath='{.data.config\.yaml}' >"$WORK/config.yaml"
  local lease
  lease=$(python -c 'import sys,yaml; print(yaml.safe_load(open(sys.argv[1]))["serve"]["leader_election"]["lease_name"])' "$WORK/config.yaml")
  mkdir -p "$WORK/data"
  KUBECONFIG=$SA_KUBECONFIG POD_NAME=$identity POD_NAMESPACE=$NS \
    DLQ_BRIDGE_API_TOKEN=$(echo "$TOKEN1" | base64 -d) \
    DLQ_BRIDGE__SERVE__LISTEN=127.0.0.1:0 DLQ_BRIDGE__SERVE__DATA_DIR=$WORK/data \
    XDG_STATE_HOME=$WORK/data DLQ_BRIDGE_LOG=info \
    "$bin" serve --config "$WORK/config.yaml" >"$WORK/serve.log" 2>&1 &
  SERVE_PID=$!
  local deadline=$((SECONDS + 90)) holder=""
  while ((SECONDS < deadline)); do
    kill -0 "$SERVE_PID" 2>/dev/null || { cat "$WORK/serve.log" >&2; die "dlq-bridge serve exited"; }
    holder=$(kubectl get lease "$lease" -n "$NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
    [ "$holder" = "$identity" ] && break
    sleep 1
  done
  [ "$holder" = "$identity" ] || { tail -30 "$WORK/serve.log" >&2; die "lease $NS/$lease held by '${holder}', expected '$identity'"; }
  echo "  lease $NS/$lease held by $identity (dlq-bridge serve with the ServiceAccount token)"
  # Port 0: the kernel picks a free port at bind time, so no other socket can take
  # it between choosing and binding (a probe-then-bind port raced the kube client's
  # own ephemeral ports once). serve prints the address it bound.
  port=$(sed -n 's|.*listening on http://127\.0\.0\.1:\([0-9]*\).*|\1|p' "$WORK/serve.log" | head -1)
  [ -n "$port" ] || { tail -30 "$WORK/serve.log" >&2; die "dlq-bridge serve did not say where it listens"; }
  curl -fsS --max-time 5 --retry 10 --retry-connrefused --retry-delay 1 "http://127.0.0.1:$port/healthz" >/dev/null ||
    { tail -30 "$WORK/serve.log" >&2; die "/healthz did not answer"; }
  echo "  /healthz answered on 127.0.0.1:$port"
  # Graceful shutdown hands the lease back (DESIGN §5): the holder is cleared.
  kill -TERM "$SERVE_PID"
  wait "$SERVE_PID" 2>/dev/null || true
  SERVE_PID=""
  holder=$(kubectl get lease "$lease" -n "$NS" -o jsonpath='{.spec.holderIdentity}' 2>/dev/null || true)
  [ "$holder" != "$identity" ] || die "lease $NS/$lease still held by $identity after SIGTERM"
  echo "  after SIGTERM the lease holder is '${holder}' (released)"
}

step "leader election with the ServiceAccount token (check_leader_election)"
BIN=$DLQ_BRIDGE_BIN
if "$BIN" serve --help >/dev/null 2>&1; then
  check_leader_election "$BIN"
elif [ "$LEADER_ELECTION_CHECK" = required ]; then
  die "step 7: '$BIN serve' does not exist (DLQ_BRIDGE_LEADER_ELECTION_CHECK=required)"
else
  echo "  NOT RUN: '$BIN' has no 'serve' command yet (issue 6)."
  echo "  NOT RUN: DLQ_BRIDGE_LEADER_ELECTION_CHECK=auto lets this pass; the default (required) fails."
fi

step "chart checks passed"
