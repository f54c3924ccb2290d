"""Value variations of charts/dlq-bridge, asserted on the rendered objects."""

import hashlib

import yaml

from conftest import container_of, env_of

LEASE_RULES = [
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["create"]},
    {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "resourceNames": ["rel-dlq-bridge"],
     "verbs": ["get", "update"]},
]


def test_default_renders_a_hardened_standalone_deployment(render):
    r = render()
    assert r.kinds() == {"ServiceAccount", "Secret", "ConfigMap", "Service", "Deployment"}
    assert not r.has("Role") and not r.has("RoleBinding")  # leader election is off

    dep = r.one("Deployment", "rel-dlq-bridge")
    assert dep["metadata"]["namespace"] == "dlq"
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "rel-dlq-bridge"
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}

    c = container_of(pod)
    assert c["image"] == "dlq-bridge:0.1.0"
    assert c["args"] == ["serve", "--config", "/etc/dlq-bridge/config.yaml"]
    sc = c["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "dlq-http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "dlq-http"}
    assert c["ports"] == [{"name": "dlq-http", "containerPort": 9090, "protocol": "TCP"}]

    env = env_of(c)
    assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    assert env["POD_NAMESPACE"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.namespace"
    assert env["DLQ_BRIDGE_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "rel-dlq-bridge-auth", "key": "api-token"}
    assert len(r.secret_value("rel-dlq-bridge-auth", "api-token")) == 40

    # Mounts: config read-only, writable data dir and /tmp on volumes (root FS is read-only).
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/dlq-bridge"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/dlq-bridge"]["name"]]["configMap"]["name"] == "rel-dlq-bridge"
    assert "emptyDir" in volumes[mounts["/var/lib/dlq-bridge"]["name"]]
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]

    svc = r.one("Service")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["port"] == 9090 and svc["spec"]["ports"][0]["targetPort"] == 9090
    labels = dep["spec"]["template"]["metadata"]["labels"]
    assert all(labels[k] == v for k, v in dep["spec"]["selector"]["matchLabels"].items())


def test_config_map_holds_the_config_with_the_serve_settings_the_chart_owns(render):
    queues = [
        {"name": "orders", "sqs": {"queue": "orders-dlq", "region": "eu-west-1"}},
        {"name": "payments", "pubsub": {"project": "p", "subscription": "payments-dlq"}},
        {"name": "invoices", "servicebus": {"connection_string_env": "SB_CONN", "queue": "invoices"}},
    ]
    rules = [{"name": "deep", "queues": "*", "depth_above": 10, "for": "5m"}]
    r = render({
        "config": {
            "redrive": {"concurrency": 8},
            "queues": queues,
            "alerts": {"rules": rules, "sinks": []},
            # listen, token_env, data_dir and leader_election are the chart's (test_reject.py):
            # probes reach the pod IP, so a token is required.
            "serve": {"poll_interval": "10s"},
        },
        "service": {"port": 8088},
        "persistence": {"type": "emptyDir", "mountPath": "/data"},
    })
    cfg = r.config()
    assert cfg["queues"] == queues
    assert cfg["redrive"] == {"concurrency": 8}
    assert cfg["alerts"]["rules"] == rules
    assert cfg["serve"] == {
        "listen": "0.0.0.0:8088",
        "token_env": "DLQ_BRIDGE_API_TOKEN",
        "data_dir": "/data",
        "leader_election": {"enabled": False},
        "poll_interval": "10s",
    }
    c = container_of(r.one("Deployment")["spec"]["template"]["spec"])
    assert c["ports"][0]["containerPort"] == 8088
    assert "/data" in {m["mountPath"] for m in c["volumeMounts"]}
    assert env_of(c)["XDG_STATE_HOME"]["value"] == "/data"


def test_config_change_rolls_the_pods(render):
    def checksum(values):
        return render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    a = checksum({})
    b = checksum({"config": {"queues": [{"name": "q", "sqs": {"queue": "q-dlq"}}]}})
    assert a != b and a == checksum({})


def test_secret_values_change_rolls_the_pods(render):
    # The environment is read at start: new secretValues must restart the pods.
    def annotations(values):
        return render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    a = annotations({"secretValues": {"OTHER_CONN": "Endpoint=sb://x/"}})
    assert a["checksum/env"] == annotations({"secretValues": {"OTHER_CONN": "Endpoint=sb://x/"}})["checksum/env"]
    assert annotations({"secretValues": {"OTHER_CONN": "Endpoint=sb://y/"}})["checksum/env"] != a["checksum/env"]
    assert annotations({"secretValues": {"OTHER_CONN": "Endpoint=sb://x/", "MORE": "1"}})["checksum/env"] != \
        a["checksum/env"]
    assert "Endpoint=sb://x/" not in str(a)
    # No chart-made env Secret, nothing to follow.
    assert "checksum/env" not in annotations({})


def test_leader_election_renders_a_role_limited_to_leases(render):
    r = render({"leaderElection": {"enabled": True, "leaseDuration": "20s"}, "replicaCount": 3})
    role = r.one("Role")
    # What serve calls (get, create, replace) on its own Lease only: in sidecar
    # mode the app shares the ServiceAccount.
    assert role["rules"] == LEASE_RULES
    rb = r.one("RoleBinding")
    assert rb["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": role["metadata"]["name"]}
    assert rb["subjects"] == [{"kind": "ServiceAccount", "name": "rel-dlq-bridge", "namespace": "dlq"}]
    assert r.config()["serve"]["leader_election"] == {"enabled": True, "lease_name": "rel-dlq-bridge", "lease_duration": "20s"}
    dep = r.one("Deployment")
    assert dep["spec"]["replicas"] == 3
    # The in-cluster token is needed to talk to the API server.
    assert dep["spec"]["template"]["spec"]["automountServiceAccountToken"] is True
    assert r.one("ServiceAccount")["automountServiceAccountToken"] is True


def test_custom_lease_name_and_existing_service_account(render):
    r = render({"leaderElection": {"enabled": True, "leaseName": "my-lease"},
                "serviceAccount": {"create": False, "name": "shared"}})
    assert not r.has("ServiceAccount")
    assert r.config()["serve"]["leader_election"]["lease_name"] == "my-lease"
    assert r.one("RoleBinding")["subjects"][0]["name"] == "shared"
    assert r.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "shared"


def test_workload_identity_aws_irsa(render):
    arn = "arn:aws:iam::123456789012:role/dlq-bridge"
    r = render({"workloadIdentity": {"aws": {"roleArn": arn}}})
    assert r.one("ServiceAccount")["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": arn}
    assert "azure.workload.identity/use" not in r.one("Deployment")["spec"]["template"]["metadata"]["labels"]


def test_workload_identity_gke(render):
    gsa = "dlq-bridge@my-project.iam.gserviceaccount.com"
    r = render({"workloadIdentity": {"gcp": {"serviceAccount": gsa}}})
    assert r.one("ServiceAccount")["metadata"]["annotations"] == {"iam.gke.io/gcp-service-account": gsa}


def test_workload_identity_azure_sets_annotation_and_pod_label(render):
    cid, tid = "11111111-2222-3333-4444-555555555555", "66666666-7777-8888-9999-000000000000"
    r = render({"workloadIdentity": {"azure": {"clientId": cid, "tenantId": tid}},
                "serviceAccount": {"annotations": {"extra": "yes"}}})
    sa = r.one("ServiceAccount")
    assert sa["metadata"]["annotations"] == {
        "azure.workload.identity/client-id": cid, "azure.workload.identity/tenant-id": tid, "extra": "yes"}
    labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true"


def test_existing_token_secret_is_referenced_not_created(render):
    r = render({"auth": {"existingSecret": "ops-token", "existingSecretKey": "token"}})
    assert not r.has("Secret")
    env = env_of(container_of(r.one("Deployment")["spec"]["template"]["spec"]))
    assert env["DLQ_BRIDGE_API_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "ops-token", "key": "token"}


def test_given_token_goes_into_the_chart_secret(render):
    r = render({"auth": {"token": "s3cret-token-0123456789"}})
    assert r.secret_value("rel-dlq-bridge-auth", "api-token") == "s3cret-token-0123456789"


def test_token_changes_restart_the_pods_and_stay_out_of_the_pod_spec(render):
    def annotations(values):
        return render(values).one("Deployment")["spec"]["template"]["metadata"]["annotations"]
    a = annotations({"auth": {"token": "s3cret-token-0123456789"}})
    assert a["checksum/auth"] == hashlib.sha256(b"s3cret-token-0123456789").hexdigest()
    assert a == annotations({"auth": {"token": "s3cret-token-0123456789"}}), "stable across renders"
    assert annotations({"auth": {"token": "another-token-0123456789"}})["checksum/auth"] != a["checksum/auth"]
    # A generated token: the pods carry the checksum of the one in the Secret.
    r = render({"auth": {"generate": True}})
    token = r.secret_value("rel-dlq-bridge-auth", "api-token")
    got = r.one("Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/auth"]
    assert got == hashlib.sha256(token.encode()).hexdigest()
    # An existing Secret: its content is not visible to the chart; its name is.
    e = annotations({"auth": {"existingSecret": "ops-token"}})
    assert e["checksum/auth"] != annotations({"auth": {"existingSecret": "ops-token-2"}})["checksum/auth"]
    assert "s3cret" not in str(render({"auth": {"token": "s3cret-token-0123456789"}}).one("Deployment"))


def test_shared_claims_get_a_data_directory_per_pod(render, render_parent):
    def data_dir_env(r, kind="Deployment"):
        env = env_of(container_of(r.one(kind)["spec"]["template"]["spec"]))
        names = [n for n in env]
        return env.get("DLQ_BRIDGE__SERVE__DATA_DIR"), names
    pvc = {"type": "pvc", "mountPath": "/var/lib/dlq-bridge", "pvc": {"accessModes": ["ReadWriteMany"]}}
    got, names = data_dir_env(render({"persistence": pvc, "replicaCount": 2, "leaderElection": {"enabled": True}}))
    assert got == {"name": "DLQ_BRIDGE__SERVE__DATA_DIR", "value": "/var/lib/dlq-bridge/$(POD_NAME)"}
    # $(POD_NAME) expands only when POD_NAME is defined before it.
    assert names.index("POD_NAME") < names.index("DLQ_BRIDGE__SERVE__DATA_DIR")
    # CLI commands run in the pod (kubectl exec) keep their state there too.
    r = render({"persistence": pvc, "replicaCount": 2, "leaderElection": {"enabled": True}})
    env = env_of(container_of(r.one("Deployment")["spec"]["template"]["spec"]))
    assert env["XDG_STATE_HOME"]["value"] == "/var/lib/dlq-bridge/$(POD_NAME)"
    assert names.index("POD_NAME") < names.index("XDG_STATE_HOME")
    # One replica keeps the claim's root (its journal survives restarts); emptyDir is per pod anyway.
    assert data_dir_env(render({"persistence": pvc}))[0] is None
    assert data_dir_env(render({"replicaCount": 2, "leaderElection": {"enabled": True}}))[0] is None
    # Sidecar mode: the chart cannot know how many pods carry it.
    parent = render_parent({"dlq-bridge": {"persistence": pvc}})
    assert data_dir_env(parent)[0]["value"] == "/var/lib/dlq-bridge/$(POD_NAME)"


def test_connection_string_secrets(render):
    r = render({
        "secretEnv": [{"name": "SB_CONN", "secretName": "servicebus", "key": "connection-string"}],
        "envFromSecrets": ["more-env"],
        "secretValues": {"OTHER_CONN": "Endpoint=sb://x/"},
        "extraEnv": [{"name": "PLAIN", "value": "1"}],
    })
    c = container_of(r.one("Deployment")["spec"]["template"]["spec"])
    env = env_of(c)
    assert env["SB_CONN"]["valueFrom"]["secretKeyRef"] == {"name": "servicebus", "key": "connection-string"}
    assert env["PLAIN"]["value"] == "1"
    assert c["envFrom"] == [{"secretRef": {"name": "rel-dlq-bridge-env"}}, {"secretRef": {"name": "more-env"}}]
    assert r.secret_value("rel-dlq-bridge-env", "OTHER_CONN") == "Endpoint=sb://x/"


def test_ca_bundle_is_mounted_and_named_by_ssl_cert_file(render):
    r = render({"caBundle": {"configMap": "corp-ca", "key": "bundle.pem"}})
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    c = container_of(pod)
    assert env_of(c)["SSL_CERT_FILE"]["value"] == "/etc/dlq-bridge-ca/bundle.pem"
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert mounts["/etc/dlq-bridge-ca"]["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mounts["/etc/dlq-bridge-ca"]["name"]]["configMap"] == {
        "name": "corp-ca", "items": [{"key": "bundle.pem", "path": "bundle.pem"}]}
    # Off by default: the image's own public CAs.
    pod = render().one("Deployment")["spec"]["template"]["spec"]
    assert "SSL_CERT_FILE" not in env_of(container_of(pod))
    assert all(v["name"] != "dlq-bridge-ca" for v in pod["volumes"])


def test_persistent_data_dir(render):
    r = render({"persistence": {"type": "pvc", "mountPath": "/var/lib/dlq-bridge",
                                "pvc": {"size": "5Gi", "storageClassName": "fast"}}})
    pvc = r.one("PersistentVolumeClaim", "rel-dlq-bridge-data")
    assert pvc["spec"]["resources"]["requests"]["storage"] == "5Gi"
    assert pvc["spec"]["storageClassName"] == "fast"
    dep = r.one("Deployment")
    assert dep["spec"]["strategy"] == {"type": "Recreate"}
    vols = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert vols["dlq-bridge-data"]["persistentVolumeClaim"] == {"claimName": "rel-dlq-bridge-data"}

    r = render({"persistence": {"type": "pvc", "mountPath": "/var/lib/dlq-bridge", "pvc": {"existingClaim": "mine"}}})
    assert not r.has("PersistentVolumeClaim")
    vols = {v["name"]: v for v in r.one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert vols["dlq-bridge-data"]["persistentVolumeClaim"] == {"claimName": "mine"}


def test_image_digest_and_pull_secrets(render):
    digest = "sha256:" + "a" * 64
    r = render({"image": {"repository": "reg.example.com/dlq-bridge", "digest": digest, "pullPolicy": "Always"},
                "imagePullSecrets": [{"name": "reg"}]})
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert container_of(pod)["image"] == f"reg.example.com/dlq-bridge@{digest}"
    assert container_of(pod)["imagePullPolicy"] == "Always"
    assert pod["imagePullSecrets"] == [{"name": "reg"}]


def test_service_monitor(render):
    r = render({"serviceMonitor": {"enabled": True, "interval": "15s", "labels": {"release": "prom"}}})
    sm = r.one("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "prom"
    svc = r.one("Service")
    assert all(svc["metadata"]["labels"][k] == v for k, v in sm["spec"]["selector"]["matchLabels"].items())
    assert sm["spec"]["endpoints"] == [{"port": "dlq-http", "path": "/metrics", "interval": "15s", "scrapeTimeout": "10s"}]
    assert sm["spec"]["namespaceSelector"] == {"matchNames": ["dlq"]}


def test_prometheus_rule_mirrors_the_builtin_rules(render):
    r = render({"prometheusRule": {
        "enabled": True, "queueRegex": "orders|payments",
        "depthAbove": {"enabled": True, "threshold": 25, "for": "10m", "severity": "page"},
        "growth": {"enabled": True, "messages": 50, "window": "30m", "for": "0m", "severity": "critical"},
        "additionalRules": [{"alert": "Custom", "expr": "vector(1)"}],
    }})
    pr = r.one("PrometheusRule")
    [group] = pr["spec"]["groups"]
    rules = {rule.get("alert"): rule for rule in group["rules"]}
    assert set(rules) == {"DlqBridgeDepthAbove", "DlqBridgeOldestMessageAgeAbove", "DlqBridgeGrowth",
                          "DlqBridgePollErrors", "DlqBridgeStale", "DlqBridgeRunFailed",
                          "DlqBridgeNotificationsLost", "Custom"}
    depth = rules["DlqBridgeDepthAbove"]
    assert depth["expr"] == 'max by (queue, backend) (dlq_bridge_messages{queue=~"orders|payments"}) > 25'
    assert depth["for"] == "10m" and depth["labels"] == {"severity": "page", "rule": "depth_above"}
    assert "{{ $labels.queue }}" in depth["annotations"]["summary"]
    age = rules["DlqBridgeOldestMessageAgeAbove"]
    assert age["expr"] == 'max by (queue, backend) (dlq_bridge_oldest_message_age_seconds{queue=~"orders|payments"}) > 3600'
    assert age["labels"]["rule"] == "oldest_age_above"
    growth = rules["DlqBridgeGrowth"]
    # Each replica counts the same arrivals: summed, two replicas would fire at 25.
    assert growth["expr"] == 'max by (queue) (increase(dlq_bridge_arrivals_total{queue=~"orders|payments"}[30m])) > 50'
    assert growth["labels"]["rule"] == "growth"
    # Poll errors keep the queue, so the alert says which one.
    errors = rules["DlqBridgePollErrors"]
    assert errors["expr"] == ('sum by (queue, backend) (increase(dlq_bridge_poll_errors_total'
                              '{queue=~"orders|payments"}[10m])) > 0')
    assert "{{ $labels.queue }}" in errors["annotations"]["summary"]
    stale = rules["DlqBridgeStale"]
    assert stale["expr"] == ('time() - max by (queue, backend) (dlq_bridge_last_poll_success_timestamp_seconds'
                             '{queue=~"orders|payments"}) > 600')
    assert stale["labels"] == {"severity": "warning"}
    # A failed scheduled, API or retention run, by queue, action and trigger.
    failed = rules["DlqBridgeRunFailed"]
    assert failed["expr"] == ('sum by (queue, action, trigger) (increase(dlq_bridge_runs_total'
                              '{outcome="failed",queue=~"orders|payments"}[1h])) > 0')
    assert "{{ $labels.queue }}" in failed["annotations"]["summary"]
    # Undelivered notifications, per sink: no queue label, so no queue selector.
    lost = rules["DlqBridgeNotificationsLost"]
    assert lost["expr"] == ('sum by (sink, outcome) (increase(dlq_bridge_notifications_total'
                            '{outcome=~"dropped|refused|failed"}[1h])) > 0')
    assert "{{ $labels.sink }}" in lost["annotations"]["summary"]


def test_prometheus_rule_can_disable_single_alerts(render):
    r = render({"prometheusRule": {"enabled": True, "oldestAgeAbove": {"enabled": False},
                                   "pollErrors": {"enabled": False}, "stale": {"enabled": False},
                                   "runFailures": {"enabled": False},
                                   "notificationsLost": {"enabled": False}}})
    alerts = {rule["alert"] for rule in r.one("PrometheusRule")["spec"]["groups"][0]["rules"]}
    assert alerts == {"DlqBridgeDepthAbove", "DlqBridgeGrowth"}


def test_monitoring_objects_are_off_by_default(render):
    r = render()
    assert not r.has("ServiceMonitor") and not r.has("PrometheusRule")


def test_sidecar_mode_renders_supporting_objects_only(render):
    r = render({"mode": "sidecar", "sidecar": {"podSelector": {"app": "orders"}},
                "leaderElection": {"enabled": True}})
    assert not r.has("Deployment")
    assert r.kinds() == {"ServiceAccount", "Secret", "ConfigMap", "Service", "Role", "RoleBinding"}
    assert r.one("Service")["spec"]["selector"] == {"app": "orders"}
    r = render({"mode": "sidecar", "service": {"enabled": False, "port": 9090}})
    assert not r.has("Service")


def test_sidecar_mode_with_a_claim_every_pod_can_mount(render):
    # A chart-made ReadWriteOnce claim is refused in sidecar mode (test_reject.py).
    sidecar = {"mode": "sidecar", "sidecar": {"podSelector": {"app": "orders"}}}
    r = render({**sidecar, "persistence": {"type": "pvc", "pvc": {"accessModes": ["ReadWriteMany"]}}})
    assert r.one("PersistentVolumeClaim", "rel-dlq-bridge-data")["spec"]["accessModes"] == ["ReadWriteMany"]
    r = render({**sidecar, "persistence": {"type": "pvc", "pvc": {"existingClaim": "mine"}}})
    assert not r.has("PersistentVolumeClaim")


def test_slack_sink_names_the_variable_holding_its_url(render):
    # A Slack url itself is refused (test_reject.py): it would sit in the ConfigMap.
    sinks = [{"slack": {"url_env": "SLACK_WEBHOOK_URL"}}]
    r = render({"config": {"alerts": {"sinks": sinks}},
                "secretEnv": [{"name": "SLACK_WEBHOOK_URL", "secretName": "slack", "key": "url"}]})
    assert r.config()["alerts"]["sinks"] == sinks
    env = env_of(container_of(r.one("Deployment")["spec"]["template"]["spec"]))
    assert env["SLACK_WEBHOOK_URL"]["valueFrom"]["secretKeyRef"] == {"name": "slack", "key": "url"}


def test_parent_chart_native_sidecar(render_parent):
    r = render_parent()
    dep = r.one("Deployment", "rel-orders")
    pod = dep["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["orders"]
    [sidecar] = pod["initContainers"]
    assert sidecar["name"] == "dlq-bridge" and sidecar["restartPolicy"] == "Always"
    assert sidecar["securityContext"]["readOnlyRootFilesystem"] is True
    assert env_of(sidecar)["DLQ_BRIDGE_API_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "rel-dlq-bridge-auth"
    assert pod["serviceAccountName"] == "rel-dlq-bridge"
    # The volumes the sidecar mounts exist in the pod and point at the subchart's objects.
    vols = {v["name"]: v for v in pod["volumes"]}
    assert {m["name"] for m in sidecar["volumeMounts"]} <= set(vols)
    assert vols["dlq-bridge-config"]["configMap"]["name"] == r.one("ConfigMap")["metadata"]["name"]
    # Workload identity and lease RBAC come with the subchart.
    sa = r.one("ServiceAccount", "rel-dlq-bridge")
    assert sa["metadata"]["annotations"]["eks.amazonaws.com/role-arn"] == "arn:aws:iam::123456789012:role/orders-dlq-bridge"
    assert r.one("RoleBinding")["subjects"][0] == {"kind": "ServiceAccount", "name": "rel-dlq-bridge", "namespace": "shop"}
    assert r.one("Service")["spec"]["selector"] == {"app.kubernetes.io/name": "orders"}
    # By number: before Kubernetes 1.32 a named port declared only on a
    # native sidecar left the Service without endpoints (kubernetes#127958).
    for version in ["1.30.0", "1.32.0"]:
        [port] = render_parent(kube_version=version).one("Service")["spec"]["ports"]
        assert port["targetPort"] == sidecar["ports"][0]["containerPort"] == 9090, version
    assert r.config()["queues"][0]["name"] == "orders"
    assert r.config()["serve"]["leader_election"]["enabled"] is True


def test_parent_chart_falls_back_to_a_classic_sidecar_before_kubernetes_1_29(render_parent):
    # An API server without native sidecars would keep the init container
    # running for ever, and the app's containers would never start.
    for version in ["1.27.0", "1.28.9"]:
        pod = render_parent(kube_version=version).one("Deployment")["spec"]["template"]["spec"]
        assert "initContainers" not in pod, version
        assert [c["name"] for c in pod["containers"]] == ["orders", "dlq-bridge"], version
    pod = render_parent(kube_version="1.29.0").one("Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["initContainers"]] == ["dlq-bridge"]


def test_listen_address_for_ipv6_clusters(render):
    assert render().config()["serve"]["listen"] == "0.0.0.0:9090"
    assert render({"service": {"listenAddress": "[::]"}}).config()["serve"]["listen"] == "[::]:9090"


def test_the_default_data_volume_holds_a_full_journal(render):
    # journal_max_bytes (64 MiB) x (journal_keep (5) + 1), with room for backups.
    vols = {v["name"]: v for v in render().one("Deployment")["spec"]["template"]["spec"]["volumes"]}
    assert vols["dlq-bridge-data"]["emptyDir"]["sizeLimit"] == "1Gi"


def test_parent_chart_classic_sidecar(render_parent):
    r = render_parent({"dlq-bridge": {"sidecar": {"native": False}}})
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["orders", "dlq-bridge"]
    assert "restartPolicy" not in pod["containers"][1]


def test_parent_chart_azure_label_reaches_the_app_pod(render_parent):
    r = render_parent({"dlq-bridge": {"workloadIdentity": {"azure": {"clientId": "11111111-2222-3333-4444-555555555555"}}}})
    labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert labels["azure.workload.identity/use"] == "true"


def test_values_file_is_valid_yaml_with_documented_defaults():
    from conftest import CHART
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["mode"] == "deployment"
    assert values["securityContext"]["readOnlyRootFilesystem"] is True


def test_the_projects_example_config_fits_the_chart(render):
    """config/example.yaml documents every config key: the schema must accept it
    (so values.schema.json keeps up with src/config/) and the ConfigMap must
    carry it unchanged, apart from the serve settings the chart owns."""
    from conftest import ROOT
    example = yaml.safe_load((ROOT / "config" / "example.yaml").read_text())
    owned = {"listen", "token_env", "data_dir", "leader_election"}
    # The example sets serve.listen and serve.leader_election, which the chart
    # refuses under `config` (it sets them from its own values): leave them out.
    example["serve"] = {k: v for k, v in example.get("serve", {}).items() if k not in owned}
    cfg = render({"config": example, "leaderElection": {"enabled": True}}).config()
    assert {k: v for k, v in cfg.items() if k != "serve"} == {k: v for k, v in example.items() if k != "serve"}
    assert {k: v for k, v in cfg["serve"].items() if k not in owned} == \
        {k: v for k, v in example.get("serve", {}).items() if k not in owned}
