"""The README's deployment examples stay true to the chart: each values file is
accepted, each Deployment is valid for Kubernetes 1.30, and its dlq-bridge sidecar
matches what the chart's own sidecar template renders for those values."""

import re

import kubernetes_validate
import pytest
import yaml

from conftest import ROOT, container_of, env_of

CLOUDS = ["aws", "gcp", "azure"]


def readme_examples() -> dict[str, dict]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Deploying"):]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.S)
    examples = {}
    for block in blocks:
        first = block.splitlines()[0]
        m = re.match(r"# ((values|deployment)-\w+\.yaml)", first)
        if m:
            examples[m.group(1)] = yaml.safe_load(block)
    return examples


@pytest.fixture(scope="module")
def examples():
    return readme_examples()


@pytest.mark.parametrize("cloud", CLOUDS)
def test_readme_example_matches_the_chart(examples, render, render_parent, cloud):
    values = examples[f"values-{cloud}.yaml"]
    deployment = examples[f"deployment-{cloud}.yaml"]

    kubernetes_validate.validate(deployment, "1.30.0", strict=True)

    r = render(values, namespace="shop")
    sa, cm = r.one("ServiceAccount"), r.one("ConfigMap")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == sa["metadata"]["name"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["dlq-bridge-config"]["configMap"]["name"] == cm["metadata"]["name"]

    # The chart's own rendering of the sidecar for the same values.
    expected = container_of(
        render_parent({"dlq-bridge": values}).one("Deployment")["spec"]["template"]["spec"])
    [sidecar] = pod["initContainers"]
    assert sidecar["restartPolicy"] == "Always"
    assert sidecar["args"] == expected["args"]
    assert sidecar["image"] == expected["image"].strip('"')
    assert [p["containerPort"] for p in sidecar["ports"]] == [p["containerPort"] for p in expected["ports"]]
    assert sidecar["livenessProbe"]["httpGet"] == expected["livenessProbe"]["httpGet"]
    assert sidecar["readinessProbe"]["httpGet"] == expected["readinessProbe"]["httpGet"]
    assert sidecar["volumeMounts"] == expected["volumeMounts"]
    for key, value in sidecar["securityContext"].items():
        assert expected["securityContext"][key] == value, key
    got_env, want_env = env_of(sidecar), env_of(expected)
    for name in set(want_env) - {"DLQ_BRIDGE_LOG"}:
        assert got_env.get(name) == want_env[name], name
    # The sidecar drains after the app has stopped, within the pod's grace.
    assert pod["terminationGracePeriodSeconds"] >= 25 + 30, "shutdown_grace after the app's own"
    # The pod-level pieces workload identity needs.
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    if cloud == "azure":
        assert labels["azure.workload.identity/use"] == "true"
        assert "azure.workload.identity/client-id" in sa["metadata"]["annotations"]
    if cloud == "aws":
        assert "eks.amazonaws.com/role-arn" in sa["metadata"]["annotations"]
    if cloud == "gcp":
        assert "iam.gke.io/gcp-service-account" in sa["metadata"]["annotations"]
    # The Service the chart renders selects this Deployment's pods.
    svc = r.one("Service")
    assert all(labels.get(k) == v for k, v in svc["spec"]["selector"].items())
