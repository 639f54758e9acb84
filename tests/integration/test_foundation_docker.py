"""Static checks of the deployment files (no Docker engine here): docker/compose.yaml
parses, runs one node per genesis institution, and every file it builds from exists;
the broker configs agree with the dev broker on the limits that matter."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from streams.common.config import KAFKA_VERSION, REPO_DIR

pytestmark = pytest.mark.integration

DOCKER_DIR = REPO_DIR / "docker"
INSTITUTIONS = {"otc-operator", "surveillance", "koscom", "securities-a", "securities-b"}


def _properties(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {k.strip(): v.strip() for k, v in pairs}


def test_compose_has_a_node_per_institution_and_buildable_services() -> None:
    from streams.cli.main import main

    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    services = compose["services"]
    nodes = {name.removeprefix("node-") for name in services if name.startswith("node-")}
    assert nodes == INSTITUTIONS
    for name, service in services.items():
        if name.startswith("node-"):
            command = service["command"]
            assert command[command.index("--institution") + 1] == name.removeprefix("node-")
            assert "CAPLEDGER_KAFKA_BOOTSTRAP" in service["environment"]
            _check_node_command(name.removeprefix("node-"), command, service["volumes"])
        build = service.get("build")
        if build is None:
            continue
        context = DOCKER_DIR / (build if isinstance(build, str) else build["context"])
        dockerfile = context / (build.get("dockerfile", "Dockerfile")
                                if isinstance(build, dict) else "Dockerfile")
        assert dockerfile.is_file(), f"{name}: {dockerfile} missing"
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY ") and "--from=" not in line:
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"{dockerfile}: {source} missing"
    alerts = services["surveillance-alerts"]
    context = main.make_context("capledger", list(alerts["command"]))
    group = main.get_command(context, alerts["command"][0])
    assert group is not None and "CAPLEDGER_PG_DSN" in alerts["environment"]
    run = group.get_command(context, alerts["command"][1])  # type: ignore[attr-defined]
    params = run.make_context("run", list(alerts["command"][2:])).params
    assert str(params["genesis_path"]) in [v.split(":")[1] for v in alerts["volumes"]]
    assert not any(v.endswith(".wif:ro") for v in alerts["volumes"])  # no key needed
    kafka_services = [s for n, s in services.items() if n.startswith("kafka-")]
    assert len(kafka_services) == 3
    assert all(KAFKA_VERSION in s["image"] for s in kafka_services)


def _check_node_command(institution: str, command: list[str], volumes: list[str]) -> None:
    """The command parses with the real CLI, and the key it loads is mounted (only it)."""
    from streams.cli.main import main
    from streams.common.genesis_files import key_path

    context = main.make_context("capledger", list(command))
    node = main.get_command(context, command[0])
    assert node is not None, f"no command {command[0]!r}"
    params = node.make_context(command[0], list(command[1:])).params
    targets = [volume.split(":")[1] for volume in volumes]
    assert str(params["genesis_path"]) in targets
    keys = [target for target in targets if target.endswith(".wif")]
    assert keys == [str(key_path(params["keys_dir"], institution))], keys


def test_broker_configs_agree_on_limits() -> None:
    dev = _properties(DOCKER_DIR / "kafka" / "server.properties")
    cluster = _properties(DOCKER_DIR / "kafka" / "cluster.properties")
    for key in ("message.max.bytes", "replica.fetch.max.bytes", "auto.create.topics.enable",
                "process.roles", "log.retention.hours"):
        assert dev[key] == cluster[key], key
    assert dev["auto.create.topics.enable"] == "false"
    assert int(dev["message.max.bytes"]) >= 8 * 1024 * 1024
    pom = (DOCKER_DIR / "kafka" / "pom.xml").read_text()
    match = re.search(r"<kafka.version>([^<]+)</kafka.version>", pom)
    assert match is not None and match.group(1) == KAFKA_VERSION


def test_compose_wires_metrics_ports_and_healthchecks() -> None:
    """Every node and the projector serve their probe port (the real CLI's settings read
    from the service's environment), publish it on a host port of their own, and the
    healthcheck probes that port's /healthz; the projector follows with the DSN set."""
    from streams.cli.main import main
    from streams.common import config

    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    services = compose["services"]
    probed = {name: s for name, s in services.items()
              if name.startswith("node-") or name == "projector"}
    assert len(probed) == len(INSTITUTIONS) + 1
    host_ports = []
    for name, service in probed.items():
        settings = config.load({k: str(v) for k, v in service["environment"].items()})
        assert settings.metrics_port > 0 and settings.metrics_host == "0.0.0.0", name
        (mapping,) = service["ports"]
        host, host_port, container_port = mapping.split(":")
        assert host == "127.0.0.1" and int(container_port) == settings.metrics_port, name
        host_ports.append(host_port)
        check = " ".join(service["healthcheck"]["test"])
        assert f"127.0.0.1:{settings.metrics_port}/healthz" in check, name
    assert len(set(host_ports)) == len(host_ports), host_ports
    projector = services["projector"]
    command = projector["command"]
    context = main.make_context("capledger", list(command))
    project = main.get_command(context, command[0])
    assert project is not None
    params = project.make_context(command[0], list(command[1:])).params
    assert params["follow"] is True and "CAPLEDGER_PG_DSN" in projector["environment"]
    assert services["surveillance-alerts"]["healthcheck"] == {"disable": True}
