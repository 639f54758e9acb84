"""Settings of the capital-ledger shell, read from the environment with defaults.

Owns: every environment variable the shell reads (names, defaults, parsing) and
the pinned Kafka version. Nothing else reads ``os.environ``, except for the key
passphrase (CAPLEDGER_KEY_PASSPHRASE_FILE, CAPLEDGER_KEY_PASSPHRASE), read only by
``streams/common/keystore.py`` when a key is opened, so that the secret never sits in
``Settings`` (whose repr shows up in logs and test reports).

Variables:
  CAPLEDGER_STATE_DIR      runtime state (Kafka data and logs, pid files)
                           default ~/.local/state/capital-ledger
  CAPLEDGER_CACHE_DIR      downloads (Maven repository, Kafka jars)
                           default ~/.cache/capital-ledger
  CAPLEDGER_KAFKA_BOOTSTRAP  broker address, default 127.0.0.1:9092 (with several local
                           brokers: the first one's; a comma-separated list is taken
                           as given, its first entry being the first broker)
  CAPLEDGER_KAFKA_BROKERS  brokers of the local cluster (``capledger dev up --brokers``),
                           default 1; broker i (1..n) listens on the first broker's port
                           + 2(i-1) and its controller on that + 1, and clients bootstrap
                           from all of them (docs/decisions/0100)
  CAPLEDGER_KAFKA_CONTROLLER_PORT  KRaft controller port of a single broker, default
                           broker port + 1
  CAPLEDGER_PG_DSN         default postgresql://capledger:capledger@127.0.0.1:5432/capledger
  CAPLEDGER_KAFKA_HEAP     JVM heap flags for the dev broker, default "-Xms1g -Xmx1g"
  CAPLEDGER_KAFKA_SECURITY   sasl_ssl (default: TLS + SCRAM-SHA-512 + ACLs) or plaintext
                           (debugging only: no encryption, no authentication)
  CAPLEDGER_KAFKA_PRINCIPAL  the Kafka principal this process connects as, default admin
                           (the local set-up's principal; nodes, tools and external
                           systems set their own)
  CAPLEDGER_KAFKA_PASSWORD_FILE  the principal's SCRAM password (mode 0600), default
                           $CAPLEDGER_STATE_DIR/kafka/credentials/<principal>.password
  CAPLEDGER_KAFKA_CA_FILE  the CA certificate clients verify the broker with, default
                           $CAPLEDGER_STATE_DIR/kafka/tls/ca.pem
  CAPLEDGER_CLOCK_OFFSET_MS  milliseconds added to this process's wall clock
                           (streams/common/clock.py), default 0; a test's way to run
                           a node whose machine clock is off (at most CLOCK_OFFSET_MS_MAX)
  CAPLEDGER_METRICS_PORT   the port of a node's or follow-projector's /metrics,
                           /healthz and /readyz; default 0 = off (streams/common/probes.py)
  CAPLEDGER_METRICS_HOST   the address that port listens on, default 127.0.0.1
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

# Keep in step with docker/kafka/pom.xml (kafka.version); why: docs/decisions/0001.
KAFKA_VERSION = "4.1.1"
SCALA_VERSION = "2.13"

DEFAULT_KAFKA_BOOTSTRAP = "127.0.0.1:9092"
DEFAULT_PG_DSN = "postgresql://capledger:capledger@127.0.0.1:5432/capledger"
DEFAULT_KAFKA_HEAP = "-Xms1g -Xmx1g"  # as docker/kafka: no heap resizing under load
KAFKA_SECURITY_MODES = ("sasl_ssl", "plaintext")
DEFAULT_KAFKA_SECURITY = "sasl_ssl"
DEFAULT_KAFKA_PRINCIPAL = "admin"
DEFAULT_METRICS_HOST = "127.0.0.1"
CLOCK_OFFSET_MS_MAX = 7 * 24 * 3600 * 1000
KAFKA_BROKERS_MAX = 9
# Local cluster: broker i's client port is the first one's + PORT_STRIDE * (i - 1); its
# controller port the one after.
PORT_STRIDE = 2

REPO_DIR = Path(__file__).resolve().parents[2]


@dataclass(frozen=True, slots=True)
class Settings:
    state_dir: Path
    cache_dir: Path
    kafka_bootstrap: str
    kafka_controller_port: int
    pg_dsn: str
    kafka_heap: str
    kafka_security: str = DEFAULT_KAFKA_SECURITY
    kafka_principal: str = DEFAULT_KAFKA_PRINCIPAL
    kafka_password_file_override: Path | None = None
    kafka_ca_file_override: Path | None = None
    kafka_version: str = KAFKA_VERSION
    clock_offset_ms: int = 0
    metrics_port: int = 0
    metrics_host: str = DEFAULT_METRICS_HOST
    kafka_brokers: int = 1

    @property
    def kafka_secure(self) -> bool:
        return self.kafka_security == "sasl_ssl"

    @property
    def kafka_credentials_dir(self) -> Path:
        """One password file per principal (0600), written by the local set-up."""
        return self.kafka_state_dir / "credentials"

    @property
    def kafka_tls_dir(self) -> Path:
        """The local CA and the broker's key store."""
        return self.kafka_state_dir / "tls"

    def kafka_password_file(self, principal: str | None = None) -> Path:
        """Where ``principal``'s (default: this process's) SCRAM password is read from."""
        name = self.kafka_principal if principal is None else principal
        if name == self.kafka_principal and self.kafka_password_file_override is not None:
            return self.kafka_password_file_override
        return self.kafka_credentials_dir / f"{name}.password"

    @property
    def kafka_ca_file(self) -> Path:
        return self.kafka_ca_file_override or self.kafka_tls_dir / "ca.pem"

    @property
    def kafka_host(self) -> str:
        """The first (or only) broker's host."""
        return self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[0]

    @property
    def kafka_port(self) -> int:
        """The first (or only) broker's client port."""
        return int(self.kafka_bootstrap.split(",")[0].rsplit(":", 1)[1])

    def kafka_broker_ports(self, node_id: int) -> tuple[int, int]:
        """(client port, controller port) of local broker ``node_id`` (1..n)."""
        assert 1 <= node_id <= self.kafka_brokers
        if self.kafka_brokers == 1:
            return self.kafka_port, self.kafka_controller_port
        port = self.kafka_port + PORT_STRIDE * (node_id - 1)
        return port, port + 1

    @property
    def kafka_home(self) -> Path:
        """Where the broker's jars are cached (outside the repository)."""
        return self.cache_dir / f"kafka-{self.kafka_version}"

    @property
    def kafka_state_dir(self) -> Path:
        return self.state_dir / "kafka"

    @property
    def maven_repo_dir(self) -> Path:
        return self.cache_dir / "m2"



def load(environ: dict[str, str] | None = None, *, kafka_brokers: int | None = None) -> Settings:
    """Settings from ``environ`` (default: the process environment); ``kafka_brokers``
    overrides CAPLEDGER_KAFKA_BROKERS (``capledger dev up --brokers``)."""
    env = dict(os.environ if environ is None else environ)
    if kafka_brokers is not None:
        env["CAPLEDGER_KAFKA_BROKERS"] = str(kafka_brokers)
    home = Path.home()
    state_dir = (Path(env["CAPLEDGER_STATE_DIR"]).expanduser()
                 if env.get("CAPLEDGER_STATE_DIR") else home / ".local/state/capital-ledger")
    cache_dir = (Path(env["CAPLEDGER_CACHE_DIR"]).expanduser()
                 if env.get("CAPLEDGER_CACHE_DIR") else home / ".cache/capital-ledger")
    bootstrap = env.get("CAPLEDGER_KAFKA_BOOTSTRAP") or DEFAULT_KAFKA_BOOTSTRAP
    for entry in bootstrap.split(","):
        host, sep, port = entry.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"CAPLEDGER_KAFKA_BOOTSTRAP={bootstrap!r} is not host:port[,...]")
    host, _, port = bootstrap.split(",")[0].rpartition(":")
    brokers_text = env.get("CAPLEDGER_KAFKA_BROKERS") or "1"
    if not brokers_text.isdigit() or not 1 <= int(brokers_text) <= KAFKA_BROKERS_MAX:
        raise ValueError(f"CAPLEDGER_KAFKA_BROKERS={brokers_text!r} is not 1..{KAFKA_BROKERS_MAX}")
    brokers = int(brokers_text)
    if brokers > 1 and "," not in bootstrap:
        bootstrap = ",".join(f"{host}:{int(port) + PORT_STRIDE * i}" for i in range(brokers))
    controller = env.get("CAPLEDGER_KAFKA_CONTROLLER_PORT") or str(int(port) + 1)
    if not controller.isdigit():
        raise ValueError(f"CAPLEDGER_KAFKA_CONTROLLER_PORT={controller!r} is not a port")
    security = (env.get("CAPLEDGER_KAFKA_SECURITY") or DEFAULT_KAFKA_SECURITY).lower()
    if security not in KAFKA_SECURITY_MODES:
        raise ValueError(f"CAPLEDGER_KAFKA_SECURITY={security!r} is not one of "
                         f"{', '.join(KAFKA_SECURITY_MODES)}")
    principal = env.get("CAPLEDGER_KAFKA_PRINCIPAL") or DEFAULT_KAFKA_PRINCIPAL
    metrics_port = env.get("CAPLEDGER_METRICS_PORT") or "0"
    if not metrics_port.isdigit() or int(metrics_port) > 65535:
        raise ValueError(f"CAPLEDGER_METRICS_PORT={metrics_port!r} is not a port (0 = off)")
    password_file = env.get("CAPLEDGER_KAFKA_PASSWORD_FILE")
    ca_file = env.get("CAPLEDGER_KAFKA_CA_FILE")
    return Settings(
        kafka_security=security,
        kafka_principal=principal,
        kafka_password_file_override=(Path(password_file).expanduser().resolve()
                                      if password_file else None),
        kafka_ca_file_override=Path(ca_file).expanduser().resolve() if ca_file else None,
        state_dir=state_dir.resolve(),
        cache_dir=cache_dir.resolve(),
        kafka_bootstrap=bootstrap,
        kafka_controller_port=int(controller),
        pg_dsn=env.get("CAPLEDGER_PG_DSN") or DEFAULT_PG_DSN,
        kafka_heap=env.get("CAPLEDGER_KAFKA_HEAP") or DEFAULT_KAFKA_HEAP,
        clock_offset_ms=clock_offset_ms(env),
        metrics_port=int(metrics_port),
        metrics_host=env.get("CAPLEDGER_METRICS_HOST") or DEFAULT_METRICS_HOST,
        kafka_brokers=brokers,
    )


def clock_offset_ms(environ: dict[str, str] | None = None) -> int:
    """CAPLEDGER_CLOCK_OFFSET_MS as an int (default 0); ValueError when it is not an
    integer within +-CLOCK_OFFSET_MS_MAX."""
    env = os.environ if environ is None else environ
    raw = (env.get("CAPLEDGER_CLOCK_OFFSET_MS") or "0").strip()
    try:
        offset = int(raw)
    except ValueError:
        raise ValueError(f"CAPLEDGER_CLOCK_OFFSET_MS={raw!r} is not an integer") from None
    if abs(offset) > CLOCK_OFFSET_MS_MAX:
        raise ValueError(f"CAPLEDGER_CLOCK_OFFSET_MS={offset} is beyond +-{CLOCK_OFFSET_MS_MAX}")
    return offset
