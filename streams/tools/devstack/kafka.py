"""The development Kafka broker: fetch jars with Maven, format KRaft storage, run, stop.

Owns: the broker processes of the local stack (one node by default, or a cluster of
``CAPLEDGER_KAFKA_BROKERS`` nodes; each in KRaft combined mode, loopback), their files
under ``$CAPLEDGER_STATE_DIR/kafka`` (rendered server.properties, data, pid, log —
directly there for one broker, in ``broker-<id>/`` for a cluster; the cluster id, CA
and passwords shared) and the jars under ``$CAPLEDGER_CACHE_DIR/kafka-<version>``.
The broker configuration itself is docker/kafka/server.properties; the version is
streams/common/config.py KAFKA_VERSION (= docker/kafka/pom.xml).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import uuid
from collections import deque
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

from streams.common.config import REPO_DIR, SCALA_VERSION, Settings
from streams.kafka.acls import ADMIN
from streams.kafka.topics import admin_client
from streams.tools.devstack import DevStackError, ServiceStatus, kafka_tls, require_tool

KAFKA_DOCKER_DIR = REPO_DIR / "docker" / "kafka"
POM_PATH = KAFKA_DOCKER_DIR / "pom.xml"
PROPERTIES_TEMPLATE_PATH = KAFKA_DOCKER_DIR / "server.properties"
LOG4J_CONFIG_PATH = KAFKA_DOCKER_DIR / "log4j2.xml"
JAVA_MAJOR_MIN = 17
MAVEN_TIMEOUT_S = 900
START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 30.0
PROBE_TIMEOUT_S = 5.0
POLL_INTERVAL_S = 0.2
LOG_TAIL_LINES = 30
MAIN_CLASS = "kafka.Kafka"
SECURITY_PLACEHOLDER = "# @SECURITY@\n"  # a whole line of the template
_OFFLINE_PATTERNS = ("Could not transfer", "Unknown host", "UnknownHostException",
                     "Network is unreachable", "Connection refused", "Connect timed out",
                     "offline mode", "Could not resolve dependencies")


@dataclasses.dataclass(frozen=True, slots=True)
class BrokerNode:
    """One broker of the local stack: KRaft node id, ports, its own directory."""

    node_id: int
    host: str
    port: int
    controller_port: int
    directory: Path

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


# Replication of the local cluster (decision 0100): as docker/kafka/cluster.properties.
CLUSTER_REPLICATION_MAX = 3
CLUSTER_MIN_INSYNC = 2


def broker_nodes(settings: Settings) -> list[BrokerNode]:
    """The brokers of these settings: one in ``kafka/`` (the layout of every existing
    state dir), or ``kafka_brokers`` in ``kafka/broker-<id>/``."""
    nodes = []
    for node_id in range(1, settings.kafka_brokers + 1):
        port, controller = settings.kafka_broker_ports(node_id)
        directory = (settings.kafka_state_dir if settings.kafka_brokers == 1
                     else settings.kafka_state_dir / f"broker-{node_id}")
        nodes.append(BrokerNode(node_id, settings.kafka_host, port, controller, directory))
    return nodes


def broker_node(settings: Settings, node_id: int) -> BrokerNode:
    return broker_nodes(settings)[node_id - 1]


def _node_settings(settings: Settings, node: BrokerNode) -> Settings:
    """The settings as one broker sees itself (its own address and controller port)."""
    return dataclasses.replace(settings, kafka_bootstrap=node.address,
                               kafka_controller_port=node.controller_port, kafka_brokers=1)


def libs_dir(settings: Settings) -> Path:
    return settings.kafka_home / "libs"


def _stamp_path(settings: Settings) -> Path:
    return settings.kafka_home / ".resolved"


def _pom_digest() -> str:
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def _pid_path(node: BrokerNode) -> Path:
    return node.directory / "kafka.pid"


def _log_path(node: BrokerNode) -> Path:
    return node.directory / "kafka.log"


def properties_path(node: BrokerNode) -> Path:
    return node.directory / "server.properties"


# ---------------------------------------------------------------- tools and jars


def java_executable() -> str:
    """A Java >= 17 runtime: $JAVA_HOME/bin/java, else java on PATH (installed if root)."""
    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else require_tool(
        "java", "openjdk-17-jre-headless")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except OSError as exc:
        raise DevStackError(f"Java at {java} does not run: {exc}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', out.stderr + out.stdout)
    major = int(match.group(1)) if match else 0
    if major == 1 and match and match.group(2):
        major = int(match.group(2))
    if major < JAVA_MAJOR_MIN:
        raise DevStackError(f"Kafka needs Java {JAVA_MAJOR_MIN}+, {java} is {major or '?'}; "
                            f"set JAVA_HOME to a newer JDK")
    return java


def jars_ready(settings: Settings) -> bool:
    stamp = _stamp_path(settings)
    return stamp.exists() and stamp.read_text().strip() == _pom_digest()


def fetch_jars(settings: Settings, console: Console | None = None) -> Path:
    """Resolve the broker's jars from Maven Central into the cache (once per pom)."""
    libs = libs_dir(settings)
    if jars_ready(settings):
        return libs
    console = console or Console(stderr=True)
    mvn = require_tool("mvn", "maven")
    java_executable()
    tmp = settings.kafka_home / "libs.partial"
    if tmp.exists():
        for old in tmp.iterdir():
            old.unlink()
    tmp.mkdir(parents=True, exist_ok=True)
    settings.maven_repo_dir.mkdir(parents=True, exist_ok=True)
    command = [mvn, "-B", "-f", str(POM_PATH), f"-Dmaven.repo.local={settings.maven_repo_dir}",
               f"-Dkafka.version={settings.kafka_version}", "dependency:copy-dependencies",
               f"-DoutputDirectory={tmp}"]
    tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)
    downloaded = 0
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console, transient=False) as progress:
        task = progress.add_task(f"Kafka {settings.kafka_version}: resolving jars", total=None)
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, cwd=KAFKA_DOCKER_DIR)
        assert proc.stdout is not None
        deadline = time.monotonic() + MAVEN_TIMEOUT_S
        for line in proc.stdout:
            tail.append(line.rstrip())
            if "Downloaded from" in line:
                downloaded += 1
                name = line.split("/")[-1].split(" ")[0]
                progress.update(task, description=f"Kafka {settings.kafka_version}: "
                                f"{downloaded} files downloaded, last {name}")
            if time.monotonic() > deadline:
                proc.kill()
                raise DevStackError(f"Maven took over {MAVEN_TIMEOUT_S}s resolving Kafka")
        rc = proc.wait()
        progress.update(task, description=f"Kafka {settings.kafka_version}: "
                        f"{downloaded} files downloaded, rc={rc}")
    if rc != 0:
        text = "\n".join(tail)
        offline = any(p in text for p in _OFFLINE_PATTERNS)
        hint = ("Maven could not reach Maven Central (offline? proxy?); "
                if offline else "Maven failed; ")
        raise DevStackError(f"{hint}command: {' '.join(command)}\n{text}")
    jars = list(tmp.glob("*.jar"))
    if not any(j.name.startswith(f"kafka_{SCALA_VERSION}-{settings.kafka_version}") for j in jars):
        raise DevStackError(f"Maven finished but no kafka_{SCALA_VERSION} jar in {tmp}")
    if libs.exists():
        for old in libs.iterdir():
            old.unlink()
        libs.rmdir()
    tmp.rename(libs)
    _stamp_path(settings).write_text(_pom_digest() + "\n")
    return libs


# ---------------------------------------------------------------- configuration


def _security_block(settings: Settings, node: BrokerNode) -> str:
    own = _node_settings(settings, node)
    if not settings.kafka_secure:
        return kafka_tls.plaintext_properties(own)
    tls = kafka_tls.ensure_broker_tls(settings)
    passwords = kafka_tls.ensure_credentials(settings)
    return kafka_tls.broker_security_properties(own, tls, passwords[ADMIN])


def replication_properties(brokers: int) -> tuple[int, int]:
    """(replication factor, min.insync.replicas) of a local cluster of ``brokers``."""
    replication = min(brokers, CLUSTER_REPLICATION_MAX)
    return replication, CLUSTER_MIN_INSYNC if replication >= CLUSTER_REPLICATION_MAX else 1


def render_properties(settings: Settings, node: BrokerNode | None = None) -> Path:
    """server.properties of ``node`` (default: the first broker), written 0600 (it
    holds secrets)."""
    node = node or broker_nodes(settings)[0]
    template = PROPERTIES_TEMPLATE_PATH.read_text()
    assert SECURITY_PLACEHOLDER in template
    text = template.replace(SECURITY_PLACEHOLDER, _security_block(settings, node))
    replication, min_isr = replication_properties(settings.kafka_brokers)
    voters = ",".join(f"{n.node_id}@{n.host}:{n.controller_port}"
                      for n in broker_nodes(settings))
    for key, value in {"@NODE_ID@": str(node.node_id), "@VOTERS@": voters,
                       "@DATA_DIR@": str(node.directory / "data"),
                       "@REPLICATION@": str(replication), "@MIN_ISR@": str(min_isr)}.items():
        text = text.replace(key, value)
    assert "@" not in re.sub(r"\d+@", "", re.sub(r"(?m)^#.*$", "", text)), "unrendered placeholder"
    text = _with_extra_listeners(text, settings, node)
    text = _with_peer_routes(text, settings, node)
    path = properties_path(node)
    kafka_tls.secret_dir(path.parent)
    kafka_tls.write_secret(path, text.encode())
    return path


# Optional, in the state dir: more client listeners, each advertised at an address of
# its own (a proxy or NAT in front of one group of clients). A list of
# {"name": "NODE1", "listen": {"<broker id>": port}, "advertise": {"<broker id>": port}};
# a client bootstrapping at an advertised address is told only that listener's
# addresses, so all its traffic takes that route (the network fault tests cut one
# node off this way; decision 0100).
EXTRA_LISTENERS_FILE = "extra-listeners.json"
_LISTENER_NAME = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")


def _with_extra_listeners(text: str, settings: Settings, node: BrokerNode) -> str:
    path = settings.kafka_state_dir / EXTRA_LISTENERS_FILE
    if not path.exists():
        return text
    entries = json.loads(path.read_text())
    protocol = "SASL_SSL" if settings.kafka_secure else "PLAINTEXT"
    added: dict[str, list[str]] = {"listeners": [], "advertised.listeners": [],
                                   "listener.security.protocol.map": []}
    extra_lines = []
    for entry in entries:
        name, key = str(entry["name"]), str(node.node_id)
        if not _LISTENER_NAME.match(name) or name in ("SASL_SSL", "PLAINTEXT", "CONTROLLER"):
            raise DevStackError(f"{path}: listener name {name!r} is not A-Z0-9_ or is taken")
        if key not in entry["listen"]:
            continue
        added["listeners"].append(f"{name}://{node.host}:{int(entry['listen'][key])}")
        added["advertised.listeners"].append(
            f"{name}://{node.host}:{int(entry['advertise'][key])}")
        added["listener.security.protocol.map"].append(f"{name}:{protocol}")
        if settings.kafka_secure:
            extra_lines.append(f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config="
                               "org.apache.kafka.common.security.scram.ScramLoginModule "
                               "required;")
    lines = []
    for line in text.splitlines():
        key_name = line.split("=", 1)[0]
        if added.get(key_name):
            line = ",".join([line, *added[key_name]])
        lines.append(line)
    return "\n".join([*lines, *extra_lines, ""])


# Optional, in the state dir: the routes between the brokers themselves, so a test can
# put a TCP proxy on each and cut one broker off from the others (docs/decisions/0103).
# A list of {"from": i, "to": j, "listen": port, "replication": port,
# "controller_listen": port, "controller": port} for every ordered pair of brokers,
# i == j included. Broker j serves broker i on two listeners of i's own: PEER<i>
# (replication fetches) at ``listen``, advertised at ``replication``, and CTRL<i>
# (KRaft votes and fetches, broker heartbeats) at ``controller_listen``, advertised at
# ``controller`` (proxies, or the listeners themselves when i == j). Broker i uses PEER<i>
# as its inter-broker listener and CTRL<i> as its first controller listener, so it
# reaches every other broker only at that broker's <i> addresses: every byte from i to j
# takes the route (i, j). A listener per *source* is needed because Kafka clients
# connect where the other side advertises (a KRaft leader sends its own endpoints), and
# one shared address for j could not tell 1 -> j from 2 -> j.
PEER_ROUTES_FILE = "peer-routes.json"


def _with_peer_routes(text: str, settings: Settings, node: BrokerNode) -> str:
    path = settings.kafka_state_dir / PEER_ROUTES_FILE
    if not path.exists():
        return text
    routes = sorted(json.loads(path.read_text()), key=lambda r: (int(r["from"]), int(r["to"])))
    me, host = node.node_id, node.host
    protocol = "SASL_SSL" if settings.kafka_secure else "PLAINTEXT"
    controller_protocol = "SSL" if settings.kafka_secure else "PLAINTEXT"
    added: dict[str, list[str]] = {"listeners": [], "advertised.listeners": [],
                                   "listener.security.protocol.map": []}
    extra_lines, voters, controller_names = [], [], [f"CTRL{me}"]
    for route in routes:
        source, target = int(route["from"]), int(route["to"])
        if target == me:
            for name, listen, advertise, kind in (
                    (f"PEER{source}", route["listen"], route["replication"], protocol),
                    (f"CTRL{source}", route["controller_listen"], route["controller"],
                     controller_protocol)):
                added["listeners"].append(f"{name}://{host}:{int(listen)}")
                added["advertised.listeners"].append(f"{name}://{host}:{int(advertise)}")
                added["listener.security.protocol.map"].append(f"{name}:{kind}")
            if source != me:
                controller_names.append(f"CTRL{source}")
            if settings.kafka_secure:
                extra_lines += [_peer_jaas_line(settings, f"PEER{source}"),
                                f"listener.name.ctrl{source}.ssl.client.auth=required"]
        if source == me:
            voters.append(f"{target}@{host}:{int(route['controller'])}")
    replaced = {"inter.broker.listener.name": f"PEER{me}",
                "controller.quorum.voters": ",".join(voters),
                "controller.listener.names": ",".join([*controller_names, "CONTROLLER"])}
    lines = []
    for line in text.splitlines():
        key_name = line.split("=", 1)[0]
        if added.get(key_name):
            line = ",".join([line, *added[key_name]])
        elif key_name in replaced:
            line = f"{key_name}={replaced[key_name]}"
        lines.append(line)
    return "\n".join([*lines, *extra_lines, ""])


def _peer_jaas_line(settings: Settings, name: str) -> str:
    """An inter-broker listener's SCRAM login: the broker both serves it and, as a
    client of the other brokers, authenticates on it as admin."""
    password = kafka_tls.ensure_credentials(settings)[ADMIN]
    return (f"listener.name.{name.lower()}.scram-sha-512.sasl.jaas.config="
            "org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="admin" password="{password}";')


def _cluster_id(settings: Settings) -> str:
    """A random KRaft cluster id, generated once and kept in the state dir."""
    path = settings.kafka_state_dir / "cluster.id"
    if path.exists():
        return path.read_text().strip()
    value = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")
    return value


def _classpath(settings: Settings) -> str:
    return str(libs_dir(settings) / "*")


def _mode_path(node: BrokerNode) -> Path:
    return node.directory / "security.mode"


def check_security_mode(settings: Settings, node: BrokerNode | None = None) -> bool:
    """Whether storage is formatted; refuses storage (and so a running broker) made
    for the other security mode (state dirs from before TLS + SCRAM are plaintext)."""
    node = node or broker_nodes(settings)[0]
    data = node.directory / "data"
    if not (data / "meta.properties").exists():
        return False
    mode = (_mode_path(node).read_text().strip()
            if _mode_path(node).exists() else "plaintext")
    if mode != settings.kafka_security:
        raise DevStackError(
            f"the Kafka storage in {data} was formatted for {mode!r}, not "
            f"{settings.kafka_security!r} (CAPLEDGER_KAFKA_SECURITY); run `capledger dev "
            f"down`, delete {settings.kafka_state_dir} and start again (the broker is "
            f"then secure), or use another CAPLEDGER_STATE_DIR")
    return True


def format_storage(settings: Settings, java: str, node: BrokerNode | None = None) -> None:
    """Format KRaft storage once; in the secure mode with every principal's SCRAM
    credential (``--add-scram``), passed in a 0600 argument file so no password is
    ever on a command line. Every broker of a cluster is formatted alike (one cluster
    id, the same credentials)."""
    node = node or broker_nodes(settings)[0]
    data = node.directory / "data"
    if check_security_mode(settings, node):
        return
    props = render_properties(settings, node)
    # "--name=value": a random cluster id may start with "-", which argparse would
    # take for an option.
    arguments = ["kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id(settings)}",
                 f"--config={props}"]
    if settings.kafka_secure:
        for name, password in kafka_tls.ensure_credentials(settings).items():
            arguments += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
    argfile = node.directory / "format.args"
    kafka_tls.write_secret(argfile, "\n".join(_java_quote(a) for a in arguments).encode())
    try:
        out = subprocess.run([java, "-cp", _classpath(settings),
                              f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}", f"@{argfile}"],
                             capture_output=True, text=True, timeout=120)
    finally:
        argfile.unlink(missing_ok=True)
    if out.returncode != 0:
        raise DevStackError(f"formatting Kafka storage in {data} failed:\n"
                            f"{_redact(out.stdout)}\n{_redact(out.stderr)}")
    _mode_path(node).write_text(settings.kafka_security + "\n")


def _java_quote(argument: str) -> str:
    """One argument of a java @argfile (quoted: it may hold spaces, '[' and '=')."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redact(text: str) -> str:
    return re.sub(r"password=[^\],\s]*", "password=***", text)


# ---------------------------------------------------------------- process
# ---------------------------------------------------------------- process


def _our_process(node: BrokerNode) -> psutil.Process | None:
    """The running broker started for this node's properties, if any (pid file)."""
    marker = str(properties_path(node))
    candidates: list[int] = []
    pid_path = _pid_path(node)
    if pid_path.exists():
        with contextlib.suppress(ValueError):
            candidates.append(int(pid_path.read_text().strip()))
    for pid in candidates:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            cmd = proc.cmdline()
            if MAIN_CLASS in cmd and marker in cmd and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
    return None


def _listener_pid(port: int) -> int | None:
    with contextlib.suppress(psutil.Error, OSError):
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                return conn.pid
    return None


def _port_open(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


async def _probe(bootstrap: str, settings: Settings) -> int:
    """Ask the broker for cluster metadata (as the set-up's admin principal); returns
    the number of brokers seen."""
    admin = admin_client(bootstrap, principal=ADMIN, settings=settings,
                         request_timeout_ms=int(PROBE_TIMEOUT_S * 1000))
    try:
        await asyncio.wait_for(admin.start(), PROBE_TIMEOUT_S)
        cluster = await asyncio.wait_for(admin.describe_cluster(), PROBE_TIMEOUT_S)
        return len(cluster["brokers"])
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


def _run_probe(bootstrap: str, settings: Settings) -> int:
    """asyncio.run the probe; in a thread when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_probe(bootstrap, settings))
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, _probe(bootstrap, settings)).result()


def answers(settings: Settings, node: BrokerNode | None = None, *, brokers_min: int = 1) -> bool:
    """Whether ``node`` (default: the first broker) answers and sees at least
    ``brokers_min`` brokers in the cluster."""
    node = node or broker_nodes(settings)[0]
    if not _port_open(node.host, node.port):
        return False
    try:
        return _run_probe(node.address, settings) >= brokers_min
    except Exception:
        return False


def _log_tail(node: BrokerNode) -> str:
    path = _log_path(node)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def _check_ports_free(node: BrokerNode) -> None:
    for port in (node.port, node.controller_port):
        if _port_open(node.host, port):
            holder = _listener_pid(port)
            who = ""
            if holder:
                with contextlib.suppress(psutil.Error):
                    who = f" by pid {holder} ({' '.join(psutil.Process(holder).cmdline())[:120]})"
            raise DevStackError(f"port {node.host}:{port} is taken{who}; stop it or "
                                f"set CAPLEDGER_KAFKA_BOOTSTRAP to another host:port")


def _spawn(settings: Settings, node: BrokerNode, java: str) -> psutil.Process:
    """Format (once) and start one broker process, detached, logging to its dir."""
    _check_ports_free(node)
    format_storage(settings, java, node)
    props = render_properties(settings, node)
    log = _log_path(node).open("ab")
    command = [java, *settings.kafka_heap.split(), "-XX:+UseG1GC",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
               "-cp", _classpath(settings), MAIN_CLASS, str(props)]
    with log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=node.directory)
    _pid_path(node).write_text(f"{proc.pid}\n")
    return psutil.Process(proc.pid)


def start(settings: Settings, console: Console | None = None) -> ServiceStatus:
    """Start every broker of the settings that is not running; return once each
    answers and sees the whole cluster (idempotent). The first broker's status."""
    return start_brokers(settings, console)[0]


def start_brokers(settings: Settings, console: Console | None = None,
                  node_ids: tuple[int, ...] = ()) -> list[ServiceStatus]:
    """Start the named brokers (default: all) unless running, then wait until each
    answers; with all of them, until each sees ``kafka_brokers`` brokers. A cluster's
    brokers are all launched before any wait: a KRaft quorum needs a majority of its
    controllers up."""
    console = console or Console(stderr=True)
    fetch_jars(settings, console)
    java = java_executable()
    nodes = [n for n in broker_nodes(settings) if not node_ids or n.node_id in node_ids]
    processes: dict[int, psutil.Process] = {}
    for node in nodes:
        check_security_mode(settings, node)
        running = _our_process(node)
        processes[node.node_id] = running if running is not None else _spawn(
            settings, node, java)
    wanted = settings.kafka_brokers if not node_ids else 1
    with console.status(f"starting Kafka {settings.kafka_version} at "
                        f"{', '.join(n.address for n in nodes)}"):
        for node in nodes:
            _wait_ready(settings, node, processes[node.node_id], brokers_min=wanted)
    return [status(settings, node) for node in nodes]


def _wait_ready(settings: Settings, node: BrokerNode, proc: psutil.Process, *,
                brokers_min: int = 1) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error, ChildProcessError):
                proc.wait(0)
            raise DevStackError(f"Kafka exited during start-up; log {_log_path(node)}:\n"
                                f"{_log_tail(node)}")
        if answers(settings, node, brokers_min=brokers_min):
            return
        time.sleep(POLL_INTERVAL_S)
    raise DevStackError(f"Kafka did not answer at {node.address} within "
                        f"{START_TIMEOUT_S:.0f}s; log {_log_path(node)}:\n{_log_tail(node)}")


def stop(settings: Settings) -> bool:
    """SIGTERM every broker, wait, SIGKILL if needed. Returns whether one was running.
    Also the brokers of a cluster started with more brokers than the settings now
    say (``dev down`` without CAPLEDGER_KAFKA_BROKERS)."""
    stopped = [stop_broker(settings, node.node_id) for node in broker_nodes(settings)]
    known = {node.directory for node in broker_nodes(settings)}
    for directory in sorted(settings.kafka_state_dir.glob("broker-*")):
        if directory not in known and directory.name.removeprefix("broker-").isdigit():
            node = BrokerNode(int(directory.name.removeprefix("broker-")), settings.kafka_host,
                              0, 0, directory)
            stopped.append(_stop_node(node, kill=False))
    return any(stopped)


def stop_broker(settings: Settings, node_id: int, *, kill: bool = False) -> bool:
    """Stop one broker: SIGTERM then SIGKILL after a bounded wait, or at once
    (``kill``: what a power cut does). Whether it was running."""
    return _stop_node(broker_node(settings, node_id), kill=kill)


def _stop_node(node: BrokerNode, *, kill: bool) -> bool:
    proc = _our_process(node)
    if proc is None:
        _pid_path(node).unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    _pid_path(node).unlink(missing_ok=True)
    return True


def broker_running(settings: Settings, node_id: int) -> bool:
    return _our_process(broker_node(settings, node_id)) is not None


def status(settings: Settings, node: BrokerNode | None = None) -> ServiceStatus:
    node = node or broker_nodes(settings)[0]
    proc = _our_process(node)
    up = answers(settings, node)
    detail = f"state {node.directory}"
    if up and proc is None:
        detail = "answering, but not started by this state dir"
    name = "kafka" if settings.kafka_brokers == 1 else f"kafka-{node.node_id}"
    return ServiceStatus(name=name, running=up, address=node.address,
                         pid=proc.pid if proc else None,
                         version=f"{settings.kafka_version} (KRaft)", detail=detail)


def statuses(settings: Settings) -> list[ServiceStatus]:
    return [status(settings, node) for node in broker_nodes(settings)]
