"""The local set-up's secrets for a secure broker: CA, broker key store, SCRAM passwords.

Owns: ``$CAPLEDGER_STATE_DIR/kafka/tls`` (``ca.pem``, the CA certificate clients
verify the broker with; ``broker.p12``, the broker's key and certificate in a
password-protected PKCS12 store) and ``$CAPLEDGER_STATE_DIR/kafka/credentials``
(``<principal>.password``, one random SCRAM-SHA-512 password per principal of
:func:`streams.kafka.acls.roster`). Directories are 0700, secret files 0600. The
CA's private key only lives in memory while it signs the broker certificate: a new
broker certificate means a new CA (and a new ``ca.pem`` for the clients).
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from streams.common.config import Settings
from streams.kafka.acls import Principal, roster

BROKER_COMMON_NAME = "capledger-broker"
CA_COMMON_NAME = "capital-ledger local CA"
CERT_VALIDITY_DAYS = 825
PASSWORD_BYTES = 24
SECRET_FILE_MODE = 0o600
SECRET_DIR_MODE = 0o700


@dataclass(frozen=True, slots=True)
class BrokerTls:
    ca_file: Path
    keystore_file: Path
    keystore_password: str = field(repr=False)


def secret_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(SECRET_DIR_MODE)
    return path


def write_secret(path: Path, data: bytes) -> None:
    """Write ``data`` to a file created 0600 (never world-readable, not even briefly)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, SECRET_FILE_MODE)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    tmp.replace(path)


def ensure_credentials(settings: Settings,
                       principals: tuple[Principal, ...] | None = None) -> dict[str, str]:
    """A password file per principal (kept if present); returns name -> password."""
    directory = secret_dir(settings.kafka_credentials_dir)
    found: dict[str, str] = {}
    for principal in roster(settings=settings) if principals is None else principals:
        path = directory / f"{principal.name}.password"
        if not path.exists():
            write_secret(path, (secrets.token_hex(PASSWORD_BYTES) + "\n").encode())
        found[principal.name] = path.read_text().strip()
    return found


def _names(host: str) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = [x509.DNSName("localhost"),
                                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            names.append(x509.DNSName(host))
    else:
        if str(address) != "127.0.0.1":
            names.append(x509.IPAddress(address))
    return names


def _certificate(subject: str, issuer: str, public_key: ec.EllipticCurvePublicKey,
                 signing_key: ec.EllipticCurvePrivateKey, *, ca: bool,
                 host: str = "") -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=CERT_VALIDITY_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                       critical=True)
    )
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=False, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(_names(host)),
                                        critical=False).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                   ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
    return builder.sign(signing_key, hashes.SHA256())


def ensure_broker_tls(settings: Settings) -> BrokerTls:
    """The CA certificate and the broker's key store, made once per state dir.

    The broker's certificate names 127.0.0.1, localhost and the configured host; it
    is also the broker's client certificate on the (mutual TLS) controller listener.
    """
    directory = secret_dir(settings.kafka_tls_dir)
    ca_file = directory / "ca.pem"
    keystore = directory / "broker.p12"
    password_file = directory / "broker.p12.password"
    if ca_file.exists() and keystore.exists() and password_file.exists():
        return BrokerTls(ca_file, keystore, password_file.read_text().strip())
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(CA_COMMON_NAME, CA_COMMON_NAME, ca_key.public_key(), ca_key,
                           ca=True)
    broker_key = ec.generate_private_key(ec.SECP256R1())
    broker_cert = _certificate(BROKER_COMMON_NAME, CA_COMMON_NAME, broker_key.public_key(),
                               ca_key, ca=False, host=settings.kafka_host)
    password = secrets.token_hex(PASSWORD_BYTES)
    store = pkcs12.serialize_key_and_certificates(
        b"broker", broker_key, broker_cert, [ca_cert],
        serialization.BestAvailableEncryption(password.encode()))
    write_secret(password_file, password.encode() + b"\n")
    write_secret(keystore, store)
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_file.chmod(0o644)
    return BrokerTls(ca_file, keystore, password)


def broker_security_properties(settings: Settings, tls: BrokerTls,
                               admin_password: str) -> str:
    """The listener, TLS, SASL and authorizer lines of server.properties."""
    host, port, controller = (settings.kafka_host, settings.kafka_port,
                              settings.kafka_controller_port)
    jaas = ("org.apache.kafka.common.security.scram.ScramLoginModule required "
            f'username="admin" password="{admin_password}";')
    return "\n".join([
        f"listeners=SASL_SSL://{host}:{port},CONTROLLER://{host}:{controller}",
        f"advertised.listeners=SASL_SSL://{host}:{port}",
        "listener.security.protocol.map=SASL_SSL:SASL_SSL,CONTROLLER:SSL",
        "inter.broker.listener.name=SASL_SSL",
        "sasl.enabled.mechanisms=SCRAM-SHA-512",
        "sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512",
        f"listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config={jaas}",
        "ssl.keystore.type=PKCS12",
        f"ssl.keystore.location={tls.keystore_file}",
        f"ssl.keystore.password={tls.keystore_password}",
        f"ssl.key.password={tls.keystore_password}",
        "ssl.truststore.type=PEM",
        f"ssl.truststore.location={tls.ca_file}",
        "ssl.enabled.protocols=TLSv1.3,TLSv1.2",
        "listener.name.controller.ssl.client.auth=required",
        "authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "allow.everyone.if.no.acl.found=false",
        f"super.users=User:admin;User:CN={BROKER_COMMON_NAME}",
        "",
    ])


def plaintext_properties(settings: Settings) -> str:
    """The debugging mode's listeners: no TLS, no authentication, no authorizer."""
    host, port, controller = (settings.kafka_host, settings.kafka_port,
                              settings.kafka_controller_port)
    return "\n".join([
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{host}:{controller}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
        "inter.broker.listener.name=PLAINTEXT",
        "",
    ])


def write_deployment_secrets(out_dir: Path, hosts: tuple[str, ...],
                             principals: tuple[Principal, ...]) -> list[Path]:
    """The files docker/compose.yaml mounts (decision 0060, 0061): ``ca.pem``; per broker
    host ``<host>.p12`` (its key and certificate, CN ``capledger-broker``, the host in
    its names) with ``<host>.p12.password``; ``credentials/<principal>.password``, one
    random SCRAM password per principal. Existing files are kept, except that a new CA
    (when ``ca.pem`` is missing) re-issues every broker store. Secrets are 0600."""
    directory = secret_dir(out_dir)
    credentials = secret_dir(directory / "credentials")
    written: list[Path] = []
    for principal in principals:
        path = credentials / f"{principal.name}.password"
        if not path.exists():
            write_secret(path, (secrets.token_hex(PASSWORD_BYTES) + "\n").encode())
            written.append(path)
    ca_file = directory / "ca.pem"
    if ca_file.exists() and all((directory / f"{h}.p12").exists() for h in hosts):
        return written
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = _certificate(CA_COMMON_NAME, CA_COMMON_NAME, ca_key.public_key(), ca_key,
                           ca=True)
    for host in hosts:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = _certificate(BROKER_COMMON_NAME, CA_COMMON_NAME, key.public_key(), ca_key,
                            ca=False, host=host)
        password = secrets.token_hex(PASSWORD_BYTES)
        store = pkcs12.serialize_key_and_certificates(
            b"broker", key, cert, [ca_cert],
            serialization.BestAvailableEncryption(password.encode()))
        write_secret(directory / f"{host}.p12.password", password.encode() + b"\n")
        write_secret(directory / f"{host}.p12", store)
        written += [directory / f"{host}.p12", directory / f"{host}.p12.password"]
    ca_file.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    ca_file.chmod(0o644)
    return [*written, ca_file]
