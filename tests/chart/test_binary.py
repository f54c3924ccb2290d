"""The config files the chart renders are accepted by the real dlq-bridge binary
(strict parsing, deny_unknown_fields): `dlq-bridge check` must not end with exit
code 2 (usage or config error). Backends point at closed loopback ports, so the
checks that reach them fail fast with exit code 1.

DLQ_BRIDGE_BIN names the binary (scripts/test-chart.sh builds it and sets it)."""

import os
import subprocess
from pathlib import Path

import pytest
import yaml

HERE = Path(__file__).resolve().parent
VARIANTS = sorted(p.name for p in (HERE / "values").glob("*.yaml"))


@pytest.fixture(scope="module")
def binary():
    path = os.environ.get("DLQ_BRIDGE_BIN")
    if not path:
        pytest.skip("DLQ_BRIDGE_BIN is not set (scripts/test-chart.sh sets it)")
    return path


def run_check(binary, config: dict, tmp_path) -> subprocess.CompletedProcess:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(yaml.safe_dump(config))
    env = dict(os.environ)
    env.update({
        "AWS_ENDPOINT_URL_SQS": "http://127.0.0.1:9",
        "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_REGION": "eu-west-1",
        "AWS_EC2_METADATA_DISABLED": "true",
        "PUBSUB_EMULATOR_HOST": "127.0.0.1:9",
        "SERVICEBUS_CONNECTION_STRING": "Endpoint=sb://127.0.0.1/;SharedAccessKeyName=x;SharedAccessKey=eA==;UseDevelopmentEmulator=true",
        "DLQ_BRIDGE_API_TOKEN": "t" * 32,
        # config/example.yaml's Slack sink: `check` reads what serve would.
        "SLACK_WEBHOOK_URL": "https://hooks.slack.invalid/T0/B0/x",
        "XDG_STATE_HOME": str(tmp_path),
    })
    # The chart's data_dir does not exist on this machine.
    env["DLQ_BRIDGE__SERVE__DATA_DIR"] = str(tmp_path / "data")
    return subprocess.run([binary, "check", "--config", str(cfg)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_default_config_checks_clean(binary, render, tmp_path):
    proc = run_check(binary, render().config(), tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("variant", VARIANTS)
def test_rendered_config_parses(binary, render, tmp_path, variant):
    values = yaml.safe_load((HERE / "values" / variant).read_text())
    proc = run_check(binary, render(values).config(), tmp_path)
    assert proc.returncode in (0, 1), f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    # `check` reports the config before it reaches the backends.
    assert f": ok ({len(values['config']['queues'])} queue" in proc.stdout, proc.stdout


def test_binary_rejects_what_the_schema_would(binary, tmp_path):
    # Sanity: exit code 2 really is what a config error gives.
    proc = run_check(binary, {"queus": []}, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr


def test_example_config_through_the_chart_parses(binary, render, tmp_path):
    from conftest import ROOT
    example = yaml.safe_load((ROOT / "config" / "example.yaml").read_text())
    # The example sets serve.listen and serve.leader_election, which the chart
    # refuses under `config` (it sets them from its own values): leave them out.
    owned = {"listen", "token_env", "data_dir", "leader_election"}
    example["serve"] = {k: v for k, v in example.get("serve", {}).items() if k not in owned}
    proc = run_check(binary, render({"config": example}).config(), tmp_path)
    assert proc.returncode in (0, 1), f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert f": ok ({len(example['queues'])} queue" in proc.stdout, proc.stdout
