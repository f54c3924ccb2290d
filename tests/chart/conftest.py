"""Helpers for the chart tests: render charts/dlq-bridge with helm and return the
objects as Python data (deserialised, never grepped).

Needs `helm` on PATH (scripts/tools.sh installs it; scripts/test-chart.sh runs these
tests with the tools' environment)."""

import base64
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "dlq-bridge"
FIXTURES = Path(__file__).resolve().parent / "fixtures"


class RenderError(Exception):
    pass


def _helm_template(chart: Path, values: dict | None, release: str, namespace: str,
                   kube_version: str | None = None) -> str:
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
        yaml.safe_dump(values or {}, f)
        values_file = f.name
    try:
        proc = subprocess.run(
            ["helm", "template", release, str(chart), "--namespace", namespace, "-f", values_file]
            + (["--kube-version", kube_version] if kube_version else []),
            capture_output=True, text=True, timeout=60,
        )
    finally:
        Path(values_file).unlink()
    if proc.returncode != 0:
        raise RenderError(proc.stderr)
    return proc.stdout


class Rendered:
    """The objects one `helm template` produced."""

    def __init__(self, text: str):
        self.objects = [d for d in yaml.safe_load_all(text) if d]

    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}

    def all(self, kind: str) -> list[dict]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str, name: str | None = None) -> dict:
        found = [o for o in self.all(kind) if name is None or o["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name or ''}, found {[o['metadata']['name'] for o in found]}"
        return found[0]

    def has(self, kind: str) -> bool:
        return bool(self.all(kind))

    def config(self) -> dict:
        """The dlq-bridge config file from the ConfigMap, parsed."""
        return yaml.safe_load(self.one("ConfigMap")["data"]["config.yaml"])

    def secret_value(self, name: str, key: str) -> str:
        return base64.b64decode(self.one("Secret", name)["data"][key]).decode()


def container_of(pod_spec: dict, name: str = "dlq-bridge") -> dict:
    for c in pod_spec.get("containers", []) + pod_spec.get("initContainers", []):
        if c["name"] == name:
            return c
    raise AssertionError(f"no container {name}")


def env_of(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# The chart needs a way to get the API token (auth.existingSecret, auth.token or
# auth.generate); tests that are not about it take a generated one. A test's own
# `auth` values take precedence (`{"auth": {"generate": False}}` leaves none).
BASE_VALUES = {"auth": {"generate": True}}


def with_base(values: dict | None) -> dict:
    merged = {k: dict(v) if isinstance(v, dict) else v for k, v in BASE_VALUES.items()}
    for k, v in (values or {}).items():
        if isinstance(v, dict) and isinstance(merged.get(k), dict):
            merged[k] = {**merged[k], **v}
        else:
            merged[k] = v
    return merged


@pytest.fixture
def render():
    def _render(values: dict | None = None, release: str = "rel", namespace: str = "dlq") -> Rendered:
        return Rendered(_helm_template(CHART, with_base(values), release, namespace))
    return _render


@pytest.fixture
def render_error():
    def _render_error(values: dict) -> str:
        try:
            out = _helm_template(CHART, with_base(values), "rel", "dlq")
        except RenderError as e:
            return str(e)
        raise AssertionError(f"values were accepted: {values}\n{out[:500]}")
    return _render_error


@pytest.fixture(scope="session")
def parent_chart(tmp_path_factory) -> Path:
    """tests/chart/fixtures/app-with-sidecar with charts/dlq-bridge as its subchart."""
    dest = tmp_path_factory.mktemp("parent") / "app"
    shutil.copytree(FIXTURES / "app-with-sidecar", dest)
    (dest / "charts").mkdir(exist_ok=True)
    shutil.copytree(CHART, dest / "charts" / "dlq-bridge")
    return dest


@pytest.fixture
def render_parent(parent_chart):
    def _render(values: dict | None = None, kube_version: str | None = None) -> Rendered:
        return Rendered(_helm_template(parent_chart, values, "rel", "shop", kube_version))
    return _render
