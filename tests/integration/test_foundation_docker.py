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
# The policy lines of the dev broker's secure mode the deployment must share (0060).
SECURE_POLICY_KEYS = (
    "listener.security.protocol.map", "inter.broker.listener.name", "sasl.enabled.mechanisms",
    "sasl.mechanism.inter.broker.protocol", "ssl.enabled.protocols",
    "listener.name.controller.ssl.client.auth", "authorizer.class.name",
    "allow.everyone.if.no.acl.found", "super.users", "ssl.keystore.type",
    "ssl.truststore.type",
)
SECRET_DIR = "/secrets/kafka"


def _dev_secure_properties() -> dict[str, str]:
    from streams.common.config import load
    from streams.tools.devstack.kafka_tls import BrokerTls, broker_security_properties

    tls = BrokerTls(Path("/ca.pem"), Path("/broker.p12"), "dev-placeholder")
    text = broker_security_properties(load(), tls, "dev-placeholder")
    pairs = (line.split("=", 1) for line in text.splitlines() if "=" in line)
    return {k: v for k, v in pairs}


def test_compose_kafka_is_secure_as_in_dev() -> None:
    """SASL_SSL + SCRAM + StandardAuthorizer deny-by-default, as `capledger dev up`;
    every secret a mounted file, none in the compose file, the image or a command line."""
    cluster = _properties(DOCKER_DIR / "kafka" / "cluster.properties")
    dev = _dev_secure_properties()
    for key in SECURE_POLICY_KEYS:
        assert cluster[key] == dev[key], key
    assert cluster["listeners"] == "SASL_SSL://0.0.0.0:9092,CONTROLLER://0.0.0.0:9093"
    assert "PLAINTEXT" not in cluster["listener.security.protocol.map"]
    assert cluster["ssl.keystore.location"] == f"{SECRET_DIR}/broker.p12"
    assert cluster["ssl.truststore.location"] == f"{SECRET_DIR}/ca.pem"
    for key in ("ssl.keystore.password", "ssl.key.password"):
        assert cluster[key] == "@KEYSTORE_PASSWORD@", key  # filled from a file at start
    assert 'password="@ADMIN_PASSWORD@"' in cluster[
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config"]
    entrypoint = (DOCKER_DIR / "kafka" / "entrypoint.sh").read_text()
    assert "credentials/*.password" in entrypoint and '"@$args"' in entrypoint
    assert "umask 077" in entrypoint and "--add-scram" in entrypoint
    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    for name, service in compose["services"].items():
        _check_no_inline_secret(name, service)
        if name.startswith("kafka-"):
            _check_broker_mounts(name, service["volumes"])
        elif name != "postgres":
            _check_client_secrets(name, service)


def _check_no_inline_secret(name: str, service: dict[str, object]) -> None:
    environment = service.get("environment") or {}
    assert isinstance(environment, dict)
    for key, value in environment.items():
        text = str(value)
        if "PASSWORD" in key and not key.endswith("_FILE"):
            assert text.startswith("${"), f"{name}: {key} holds a literal secret"
        assert "password=" not in text.lower(), f"{name}: {key}"


def _check_broker_mounts(name: str, volumes: list[str]) -> None:
    mounts = {v.split(":")[1]: v for v in volumes if v.startswith("./")}
    for target in (f"{SECRET_DIR}/broker.p12", f"{SECRET_DIR}/broker.p12.password",
                   f"{SECRET_DIR}/ca.pem", f"{SECRET_DIR}/credentials"):
        assert target in mounts and mounts[target].endswith(":ro"), f"{name}: {target}"
    assert f"/{name}.p12:" in mounts[f"{SECRET_DIR}/broker.p12"], name  # its own store


def _check_client_secrets(name: str, service: dict[str, object]) -> None:
    """A client container connects SASL_SSL as one principal, verifies the broker with
    the mounted CA, and mounts only that principal's password file, read-only."""
    from streams.common.kafka_auth import check_principal_name

    environment = service["environment"]
    assert isinstance(environment, dict)
    assert environment["CAPLEDGER_KAFKA_SECURITY"] == "sasl_ssl", name
    principal = check_principal_name(environment["CAPLEDGER_KAFKA_PRINCIPAL"])
    assert environment["CAPLEDGER_KAFKA_CA_FILE"] == f"{SECRET_DIR}/ca.pem", name
    password_file = environment["CAPLEDGER_KAFKA_PASSWORD_FILE"]
    assert password_file == f"{SECRET_DIR}/{principal}.password", name
    volumes = service["volumes"]
    assert isinstance(volumes, list)
    secret_mounts = [v for v in volumes if f":{SECRET_DIR}/" in v]
    assert sorted(v.split(":")[1] for v in secret_mounts) == sorted(
        [f"{SECRET_DIR}/ca.pem", password_file]), name
    assert all(v.endswith(":ro") for v in secret_mounts), name
    own = next(v for v in secret_mounts if v.split(":")[1] == password_file)
    assert own.split(":")[0].endswith(f"/credentials/{principal}.password"), name
    if name.startswith("node-"):
        assert principal == name.removeprefix("node-"), name


def test_compose_setup_service_creates_topics_as_admin() -> None:
    from streams.cli.main import main

    compose = yaml.safe_load((DOCKER_DIR / "compose.yaml").read_text())
    setup = compose["services"]["topics-setup"]
    assert setup["environment"]["CAPLEDGER_KAFKA_PRINCIPAL"] == "admin"
    context = main.make_context("capledger", list(setup["command"]))
    dev = main.get_command(context, setup["command"][0])
    assert dev is not None
    assert dev.get_command(context, setup["command"][1]) is not None  # type: ignore[attr-defined]
    for name, service in compose["services"].items():
        if name.startswith("node-"):
            assert service["depends_on"]["topics-setup"] == {
                "condition": "service_completed_successfully"}, name
