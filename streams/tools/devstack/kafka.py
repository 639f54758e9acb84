"""The development Kafka broker: fetch jars with Maven, format KRaft storage, run, stop.

Owns: the broker process of the local stack (one node, KRaft combined mode, loopback),
its files under ``$CAPLEDGER_STATE_DIR/kafka`` (rendered server.properties, data,
cluster id, pid, log) and its jars under ``$CAPLEDGER_CACHE_DIR/kafka-<version>``.
The broker configuration itself is docker/kafka/server.properties; the version is
streams/common/config.py KAFKA_VERSION (= docker/kafka/pom.xml).
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import hashlib
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


def libs_dir(settings: Settings) -> Path:
    return settings.kafka_home / "libs"


def _stamp_path(settings: Settings) -> Path:
    return settings.kafka_home / ".resolved"


def _pom_digest() -> str:
    return hashlib.sha256(POM_PATH.read_bytes()).hexdigest()


def _pid_path(settings: Settings) -> Path:
    return settings.kafka_state_dir / "kafka.pid"


def _log_path(settings: Settings) -> Path:
    return settings.kafka_state_dir / "kafka.log"


def properties_path(settings: Settings) -> Path:
    return settings.kafka_state_dir / "server.properties"


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


def _security_block(settings: Settings) -> str:
    if not settings.kafka_secure:
        return kafka_tls.plaintext_properties(settings)
    tls = kafka_tls.ensure_broker_tls(settings)
    passwords = kafka_tls.ensure_credentials(settings)
    return kafka_tls.broker_security_properties(settings, tls, passwords[ADMIN])


def render_properties(settings: Settings) -> Path:
    """server.properties for these settings, written 0600 (it holds secrets)."""
    template = PROPERTIES_TEMPLATE_PATH.read_text()
    assert SECURITY_PLACEHOLDER in template
    text = template.replace(SECURITY_PLACEHOLDER, _security_block(settings))
    for key, value in {"@HOST@": settings.kafka_host,
                       "@BROKER_PORT@": str(settings.kafka_port),
                       "@CONTROLLER_PORT@": str(settings.kafka_controller_port),
                       "@STATE_DIR@": str(settings.state_dir)}.items():
        text = text.replace(key, value)
    assert "@" not in re.sub(r"(?m)^#.*$", "", text).replace("1@", ""), "unrendered placeholder"
    path = properties_path(settings)
    kafka_tls.secret_dir(path.parent)
    kafka_tls.write_secret(path, text.encode())
    return path


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


def _mode_path(settings: Settings) -> Path:
    return settings.kafka_state_dir / "security.mode"


def check_security_mode(settings: Settings) -> bool:
    """Whether storage is formatted; refuses storage (and so a running broker) made
    for the other security mode (state dirs from before TLS + SCRAM are plaintext)."""
    data = settings.kafka_state_dir / "data"
    if not (data / "meta.properties").exists():
        return False
    mode = (_mode_path(settings).read_text().strip()
            if _mode_path(settings).exists() else "plaintext")
    if mode != settings.kafka_security:
        raise DevStackError(
            f"the Kafka storage in {data} was formatted for {mode!r}, not "
            f"{settings.kafka_security!r} (CAPLEDGER_KAFKA_SECURITY); run `capledger dev "
            f"down`, delete {settings.kafka_state_dir} and start again (the broker is "
            f"then secure), or use another CAPLEDGER_STATE_DIR")
    return True


def format_storage(settings: Settings, java: str) -> None:
    """Format KRaft storage once; in the secure mode with every principal's SCRAM
    credential (``--add-scram``), passed in a 0600 argument file so no password is
    ever on a command line."""
    data = settings.kafka_state_dir / "data"
    if check_security_mode(settings):
        return
    props = render_properties(settings)
    # "--name=value": a random cluster id may start with "-", which argparse would
    # take for an option.
    arguments = ["kafka.tools.StorageTool", "format", f"--cluster-id={_cluster_id(settings)}",
                 f"--config={props}"]
    if settings.kafka_secure:
        for name, password in kafka_tls.ensure_credentials(settings).items():
            arguments += ["--add-scram", f"SCRAM-SHA-512=[name={name},password={password}]"]
    argfile = settings.kafka_state_dir / "format.args"
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
    _mode_path(settings).write_text(settings.kafka_security + "\n")


def _java_quote(argument: str) -> str:
    """One argument of a java @argfile (quoted: it may hold spaces, '[' and '=')."""
    return '"' + argument.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _redact(text: str) -> str:
    return re.sub(r"password=[^\],\s]*", "password=***", text)


# ---------------------------------------------------------------- process


def _our_process(settings: Settings) -> psutil.Process | None:
    """The running broker started for these settings, if any (pid file, then scan)."""
    marker = str(properties_path(settings))
    candidates: list[int] = []
    pid_path = _pid_path(settings)
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


def answers(settings: Settings) -> bool:
    if not _port_open(settings.kafka_host, settings.kafka_port):
        return False
    try:
        return _run_probe(settings.kafka_bootstrap, settings) > 0
    except Exception:
        return False


def _log_tail(settings: Settings) -> str:
    path = _log_path(settings)
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-LOG_TAIL_LINES:])


def start(settings: Settings, console: Console | None = None) -> ServiceStatus:
    """Start the broker unless it runs already; return once it answers (idempotent)."""
    console = console or Console(stderr=True)
    fetch_jars(settings, console)
    java = java_executable()
    check_security_mode(settings)
    running = _our_process(settings)
    if running is not None:
        _wait_ready(settings, running)
        return status(settings)
    for port in (settings.kafka_port, settings.kafka_controller_port):
        if _port_open(settings.kafka_host, port):
            holder = _listener_pid(port)
            who = ""
            if holder:
                with contextlib.suppress(psutil.Error):
                    who = f" by pid {holder} ({' '.join(psutil.Process(holder).cmdline())[:120]})"
            raise DevStackError(f"port {settings.kafka_host}:{port} is taken{who}; stop it or "
                                f"set CAPLEDGER_KAFKA_BOOTSTRAP to another host:port")
    format_storage(settings, java)
    props = render_properties(settings)
    log = _log_path(settings).open("ab")
    command = [java, *settings.kafka_heap.split(), "-XX:+UseG1GC",
               "-Djava.awt.headless=true", f"-Dlog4j2.configurationFile={LOG4J_CONFIG_PATH}",
               "-cp", _classpath(settings), MAIN_CLASS, str(props)]
    with log:
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True,
                                cwd=settings.kafka_state_dir)
    _pid_path(settings).write_text(f"{proc.pid}\n")
    with console.status(f"starting Kafka {settings.kafka_version} at "
                        f"{settings.kafka_bootstrap} (pid {proc.pid})"):
        _wait_ready(settings, psutil.Process(proc.pid))
    return status(settings)


def _wait_ready(settings: Settings, proc: psutil.Process) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
            with contextlib.suppress(psutil.Error, ChildProcessError):
                proc.wait(0)
            raise DevStackError(f"Kafka exited during start-up; log {_log_path(settings)}:\n"
                                f"{_log_tail(settings)}")
        if answers(settings):
            return
        time.sleep(POLL_INTERVAL_S)
    raise DevStackError(f"Kafka did not answer at {settings.kafka_bootstrap} within "
                        f"{START_TIMEOUT_S:.0f}s; log {_log_path(settings)}:\n"
                        f"{_log_tail(settings)}")


def stop(settings: Settings) -> bool:
    """SIGTERM the broker, wait, SIGKILL if needed. Returns whether one was running."""
    proc = _our_process(settings)
    if proc is None:
        _pid_path(settings).unlink(missing_ok=True)
        return False
    with contextlib.suppress(psutil.NoSuchProcess):
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(STOP_TIMEOUT_S)
        except psutil.TimeoutExpired:
            proc.kill()
            proc.wait(STOP_TIMEOUT_S)
    _pid_path(settings).unlink(missing_ok=True)
    return True


def status(settings: Settings) -> ServiceStatus:
    proc = _our_process(settings)
    up = answers(settings)
    detail = f"state {settings.kafka_state_dir}"
    if up and proc is None:
        detail = "answering, but not started by this state dir"
    return ServiceStatus(name="kafka", running=up, address=settings.kafka_bootstrap,
                         pid=proc.pid if proc else None,
                         version=f"{settings.kafka_version} (KRaft)", detail=detail)
