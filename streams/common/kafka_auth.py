"""How this process authenticates to Kafka: its principal, password file and the CA.

Owns: reading the SCRAM password of the configured principal from its file (which
must be a small regular file readable by its owner only) and the TLS context that
verifies the broker against the local CA. The settings come from
:mod:`streams.common.config`; the files are written by the local set-up
(``streams.tools.devstack.kafka_tls``) or, on an institution's own machine, by its
operator. The password is never logged, printed or put in an exception message.
"""

from __future__ import annotations

import ssl
import stat
from dataclasses import dataclass, field
from pathlib import Path

from ledger.errors import ValidationError
from streams.common import config

SASL_MECHANISM = "SCRAM-SHA-512"
SECURITY_PROTOCOL = "SASL_SSL"
PASSWORD_BYTES_MAX = 1024
PRINCIPAL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
PRINCIPAL_LENGTH_MAX = 64


class KafkaAuthError(ValidationError):
    """The configured principal cannot connect: no password file, bad mode, no CA."""

    code = "kafka-auth"


def check_principal_name(name: str) -> str:
    """A principal name: lower-case letters, digits, ``-``, ``_`` and ``.`` (no SCRAM
    escaping needed, safe in file names and ACLs)."""
    if not 1 <= len(name) <= PRINCIPAL_LENGTH_MAX or not set(name) <= PRINCIPAL_CHARS:
        raise KafkaAuthError(f"principal name {name!r} is not 1-{PRINCIPAL_LENGTH_MAX} "
                             f"characters of a-z 0-9 - _ .", code="kafka-principal-name")
    return name


@dataclass(frozen=True, slots=True)
class KafkaAuth:
    """What a client needs to connect; ``secure`` False means the plaintext debug mode."""

    secure: bool
    principal: str
    ca_file: Path
    password: str = field(default="", repr=False)

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2+, the broker's certificate checked against the local CA and its name."""
        try:
            context = ssl.create_default_context(cafile=str(self.ca_file))
        except (OSError, ssl.SSLError) as exc:
            raise KafkaAuthError(f"cannot load the Kafka CA certificate {self.ca_file}: "
                                 f"{type(exc).__name__}", code="kafka-ca") from None
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.check_hostname = True
        context.verify_mode = ssl.CERT_REQUIRED
        return context


def read_password_file(path: Path) -> str:
    """The password in ``path``; refuses a file others can read, or a huge one."""
    try:
        info = path.stat()
    except OSError:
        raise KafkaAuthError(f"no Kafka password file at {path} (run `capledger dev up` on "
                             f"the set-up machine, or set CAPLEDGER_KAFKA_PASSWORD_FILE)",
                             code="kafka-credentials-missing") from None
    if not stat.S_ISREG(info.st_mode) or info.st_size > PASSWORD_BYTES_MAX:
        raise KafkaAuthError(f"{path} is not a small regular file",
                             code="kafka-credentials-file")
    if info.st_mode & 0o077:
        raise KafkaAuthError(f"{path} is readable by others (mode "
                             f"{stat.S_IMODE(info.st_mode):o}); chmod 600 it",
                             code="kafka-credentials-mode")
    password = path.read_text(encoding="utf-8").strip()
    if not password:
        raise KafkaAuthError(f"{path} is empty", code="kafka-credentials-file")
    return password


def client_auth(principal: str | None = None,
                settings: config.Settings | None = None) -> KafkaAuth:
    """The connection identity of this process (or of ``principal``, for tools and
    tests that act as several parties on the set-up machine)."""
    chosen = settings or config.load()
    name = check_principal_name(principal or chosen.kafka_principal)
    if not chosen.kafka_secure:
        return KafkaAuth(secure=False, principal=name, ca_file=chosen.kafka_ca_file)
    password = read_password_file(chosen.kafka_password_file(name))
    return KafkaAuth(secure=True, principal=name, ca_file=chosen.kafka_ca_file,
                     password=password)


CLIENT_STYLES = ("java", "librdkafka")


def client_properties(principal: str, settings: config.Settings, *, style: str,
                      include_password: bool) -> str:
    """Connection properties for an institution's own systems in any language: the
    Java client's (``java``) or librdkafka's (``librdkafka``: confluent-kafka, the Go
    and .NET clients, kcat). The password is a placeholder naming its file unless
    ``include_password``."""
    assert style in CLIENT_STYLES, style
    name = check_principal_name(principal)
    lines = [f"# capital-ledger Kafka client settings for principal {name}",
             f"bootstrap.servers={settings.kafka_bootstrap}"]
    if not settings.kafka_secure:
        return "\n".join([*lines, "security.protocol=PLAINTEXT", ""])
    password_file = settings.kafka_password_file(name)
    if not password_file.is_file():
        raise KafkaAuthError(f"no password file for principal {name} at {password_file}",
                             code="kafka-credentials-missing")
    password = (read_password_file(password_file) if include_password
                else f"<the contents of {password_file}>")
    lines += [f"security.protocol={SECURITY_PROTOCOL}", f"sasl.mechanism={SASL_MECHANISM}"]
    if style == "java":
        lines += [
            "sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule "
            f'required username="{name}" password="{password}";',
            "ssl.truststore.type=PEM",
            f"ssl.truststore.location={settings.kafka_ca_file}",
            "ssl.endpoint.identification.algorithm=https",
        ]
    else:
        lines += [
            f"sasl.username={name}",
            f"sasl.password={password}",
            f"ssl.ca.location={settings.kafka_ca_file}",
            "ssl.endpoint.identification.algorithm=https",
        ]
    return "\n".join([*lines, ""])
