"""Bad values are rejected, by values.schema.json or by the chart's own checks,
with a message that names the problem."""

import pytest

CASES = [
    ("unknown mode", {"mode": "daemonset"}, "/mode"),
    ("unknown top-level key", {"replicas": 2}, "replicas"),
    ("zero replicas", {"replicaCount": 0}, "/replicaCount"),
    ("port out of range", {"service": {"port": 70000}}, "/service/port"),
    ("bad pull policy", {"image": {"repository": "x", "pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ("empty repository", {"image": {"repository": ""}}, "/image/repository"),
    ("not an IAM role ARN", {"workloadIdentity": {"aws": {"roleArn": "my-role"}}}, "/workloadIdentity/aws/roleArn"),
    ("not a GCP service account", {"workloadIdentity": {"gcp": {"serviceAccount": "me@gmail.com"}}},
     "/workloadIdentity/gcp/serviceAccount"),
    ("not a client id", {"workloadIdentity": {"azure": {"clientId": "abc"}}}, "/workloadIdentity/azure/clientId"),
    ("bad lease duration", {"leaderElection": {"enabled": True, "leaseDuration": "15 seconds"}},
     "/leaderElection/leaseDuration"),
    ("typo in config", {"config": {"queus": []}}, "queus"),
    ("queue without name", {"config": {"queues": [{"sqs": {"queue": "q"}}]}}, "/config/queues/0"),
    ("queue with two backends", {"config": {"queues": [{"name": "q", "sqs": {"queue": "q"},
                                                         "pubsub": {"project": "p", "subscription": "s"}}]}},
     "/config/queues/0"),
    ("unknown sqs field", {"config": {"queues": [{"name": "q", "sqs": {"queue": "q", "regoin": "x"}}]}}, "regoin"),
    ("connection string inline", {"config": {"queues": [{"name": "q", "servicebus": {
        "connection_string_env": "Endpoint=sb://x/;SharedAccessKey=y", "queue": "q"}}]}},
     "/config/queues/0/servicebus/connection_string_env"),
    ("service bus without credentials or namespace", {"config": {"queues": [{"name": "q", "servicebus": {
        "queue": "q"}}]}}, "/config/queues/0/servicebus"),
    ("writable root filesystem", {"securityContext": {"readOnlyRootFilesystem": False}},
     "/securityContext/readOnlyRootFilesystem"),
    ("short token", {"auth": {"token": "abc"}}, "/auth/token"),
    ("hostPath data dir", {"persistence": {"type": "hostPath", "mountPath": "/data"}}, "/persistence/type"),
    ("bad env var name", {"secretEnv": [{"name": "my-var", "secretName": "s", "key": "k"}]}, "/secretEnv/0/name"),
    ("unknown serve key", {"config": {"serve": {"poll_intervall": "10s"}}}, "poll_intervall"),
    ("bad poll interval", {"config": {"serve": {"poll_interval": "often"}}}, "/config/serve/poll_interval"),
    ("bad alert window", {"prometheusRule": {"growth": {"window": "15 minutes"}}}, "/prometheusRule/growth/window"),
    # Checks in the templates (no schema can express them):
    ("no way to get an API token", {"auth": {"generate": False}}, "auth: set auth.existingSecret"),
    ("replicas without leader election", {"replicaCount": 2}, "needs leaderElection.enabled"),
    ("sidecar Service without selector", {"mode": "sidecar"}, "needs sidecar.podSelector"),
    ("lease shorter than serve takes", {"leaderElection": {"enabled": True, "leaseDuration": "1s"}},
     "must be at least 2s"),
    ("lease in milliseconds", {"leaderElection": {"enabled": True, "leaseDuration": "1500ms"}},
     "must be at least 2s"),
    ("leader election without a token", {"leaderElection": {"enabled": True},
                                         "serviceAccount": {"automountToken": False}},
     "needs the ServiceAccount token"),
    ("lease role for the default ServiceAccount", {"leaderElection": {"enabled": True},
                                                   "serviceAccount": {"create": False}},
     "needs serviceAccount.name"),
    ("journal outside the data volume", {"config": {"redrive": {"journal": "/tmp/j.jsonl"}}},
     "is outside persistence.mountPath"),
    ("one journal for every pod", {"config": {"redrive": {"journal": "/var/lib/dlq-bridge/j.jsonl"}},
                                   "persistence": {"type": "pvc"}, "replicaCount": 2,
                                   "leaderElection": {"enabled": True}},
     "each pod keeps its journal in its own directory"),
    ("one ReadWriteOnce claim for several replicas", {"persistence": {"type": "pvc"}, "replicaCount": 2,
                                                      "leaderElection": {"enabled": True}},
     "persistence.pvc.accessModes needs ReadWriteMany"),
    ("shutdown grace past the pod's", {"config": {"serve": {"shutdown_grace": "1m"}}},
     "needs terminationGracePeriodSeconds (60) at least 5 s longer"),
    ("listen on a host name", {"service": {"listenAddress": "localhost"}}, "/service/listenAddress"),
    ("duplicate queue names", {"config": {"queues": [{"name": "q", "sqs": {"queue": "a"}},
                                                      {"name": "q", "sqs": {"queue": "b"}}]}},
     'duplicate queue name "q"'),
    # The chart sets these serve keys itself (service, auth, persistence, leaderElection):
    ("listen set under config", {"config": {"serve": {"listen": "0.0.0.0:9090"}}},
     "config.serve.listen is set by the chart"),
    ("token_env set under config", {"config": {"serve": {"token_env": "MY_TOKEN"}}},
     "config.serve.token_env is set by the chart"),
    ("data_dir set under config", {"config": {"serve": {"data_dir": "/var/lib/dlq-bridge"}}},
     "config.serve.data_dir is set by the chart"),
    ("leader_election set under config", {"config": {"serve": {"leader_election": {"enabled": True}}}},
     "config.serve.leader_election is set by the chart"),
    ("sidecar with one ReadWriteOnce claim", {"mode": "sidecar", "sidecar": {"podSelector": {"app": "orders"}},
                                             "persistence": {"type": "pvc"}},
     "mode=sidecar with persistence.type=pvc"),
    ("Slack webhook URL in the ConfigMap", {"config": {"alerts": {"sinks": [
        {"webhook": {"url": "http://hooks.internal/dlq"}},
        {"slack": {"url": "https://hooks.slack.com/services/T0/B0/x"}}]}}},
     "config.alerts.sinks[1].slack.url"),
]


@pytest.mark.parametrize("values,expected", [(v, e) for _, v, e in CASES], ids=[c[0] for c in CASES])
def test_bad_values_are_rejected(render_error, values, expected):
    err = render_error(values)
    assert expected in err, err
