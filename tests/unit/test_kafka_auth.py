"""streams.common.kafka_auth and the set-up's secret files, without a broker."""

from __future__ import annotations

import ssl
import stat
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.common import config
from streams.common.kafka_auth import KafkaAuthError, check_principal_name, client_auth
from streams.kafka.acls import ACL_TABLE, Op, Role, bindings, roster
from streams.kafka.topics import MARKET_TOPICS, PROPOSALS, TX, VOTES
from streams.tools.devstack import kafka_tls

pytestmark = pytest.mark.unit


def _settings(state: Path, **extra: str) -> config.Settings:
    return config.load({"CAPLEDGER_STATE_DIR": str(state), **extra})


def test_setup_writes_owner_only_secrets_and_a_verifying_ca(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    tls = kafka_tls.ensure_broker_tls(settings)
    passwords = kafka_tls.ensure_credentials(settings)
    assert set(passwords) == {p.name for p in roster()}
    assert len(set(passwords.values())) == len(passwords)  # one secret per principal
    for path in [*settings.kafka_credentials_dir.iterdir(), tls.keystore_file]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert stat.S_IMODE(settings.kafka_credentials_dir.stat().st_mode) == 0o700
    assert tls.keystore_password not in repr(tls)
    auth = client_auth("koscom", settings)
    assert auth.password == passwords["koscom"] and auth.password not in repr(auth)
    context = auth.ssl_context()
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # made once: a second call keeps the same CA and passwords
    assert kafka_tls.ensure_credentials(settings) == passwords
    assert kafka_tls.ensure_broker_tls(settings).ca_file.read_bytes() == tls.ca_file.read_bytes()


def test_password_file_readable_by_others_is_refused(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    kafka_tls.ensure_credentials(settings)
    path = settings.kafka_password_file("regulator")
    path.chmod(0o644)
    with pytest.raises(KafkaAuthError) as caught:
        client_auth("regulator", settings)
    assert caught.value.code == "kafka-credentials-mode"
    assert path.read_text().strip() not in caught.value.message


def test_missing_password_file_and_bad_names(tmp_path: Path) -> None:
    with pytest.raises(KafkaAuthError) as caught:
        client_auth("koscom", _settings(tmp_path))
    assert caught.value.code == "kafka-credentials-missing"
    for bad in ("", "Admin", "a=b", "x" * 65, "a,b"):
        with pytest.raises(KafkaAuthError):
            check_principal_name(bad)


def test_password_file_override_is_for_this_process_principal(tmp_path: Path) -> None:
    secret = tmp_path / "mine.password"
    secret.write_text("s3cret\n")
    secret.chmod(0o600)
    settings = _settings(tmp_path, CAPLEDGER_KAFKA_PRINCIPAL="koscom",
                         CAPLEDGER_KAFKA_PASSWORD_FILE=str(secret))
    assert client_auth(settings=settings).password == "s3cret"
    assert settings.kafka_password_file("regulator").name == "regulator.password"


def test_acl_table_matches_the_issue() -> None:
    external = ACL_TABLE[Role.EXTERNAL]
    assert external[TX.name] == (Op.WRITE,)
    assert VOTES.name not in external and PROPOSALS.name not in external
    assert all(Op.WRITE not in ops for ops in ACL_TABLE[Role.REGULATOR].values())
    # members submit as themselves (the platform API, the market service) and write
    # the market and alert topics; readers check who signed each record
    assert Op.WRITE in ACL_TABLE[Role.MEMBER][TX.name]
    assert Op.WRITE in ACL_TABLE[Role.MEMBER][VOTES.name]
    assert all(Op.WRITE in ACL_TABLE[Role.MEMBER][spec.name] for spec in MARKET_TOPICS)
    assert all(Op.WRITE not in ops for name, ops in external.items() if name != TX.name)
    rules = bindings("p.", roster())
    assert not any(rule.principal == "User:admin" for rule in rules)
    assert all(rule.resource_name.startswith(("p.", "capledger-")) for rule in rules)
    groups = {(rule.principal, rule.resource_name) for rule in rules if rule.resource_type == 3}
    assert groups == {(f"User:{name}", f"capledger-{name}.") for name in INSTITUTION_IDS}


def test_storage_of_the_other_security_mode_is_refused(tmp_path: Path) -> None:
    from streams.tools.devstack import DevStackError
    from streams.tools.devstack.kafka import check_security_mode

    settings = _settings(tmp_path)
    assert check_security_mode(settings) is False  # not formatted yet
    data = settings.kafka_state_dir / "data"
    data.mkdir(parents=True)
    (data / "meta.properties").write_text("cluster.id=x\n")  # formatted before TLS + SCRAM
    with pytest.raises(DevStackError, match="formatted for 'plaintext'"):
        check_security_mode(settings)
    plain = _settings(tmp_path, CAPLEDGER_KAFKA_SECURITY="plaintext")
    assert check_security_mode(plain) is True


def test_librdkafka_producer_settings_map_the_shared_ones(tmp_path: Path) -> None:
    import confluent_kafka

    from streams.kafka.topics import rdkafka_producer_settings

    settings = _settings(tmp_path)
    kafka_tls.ensure_broker_tls(settings)
    passwords = kafka_tls.ensure_credentials(settings)
    conf = rdkafka_producer_settings("127.0.0.1:1", client_id="t", principal="koscom",
                                     settings=settings)
    assert conf["security.protocol"] == "SASL_SSL" and conf["sasl.mechanism"] == "SCRAM-SHA-512"
    assert conf["sasl.username"] == "koscom" and conf["sasl.password"] == passwords["koscom"]
    assert conf["ssl.ca.location"] == str(settings.kafka_ca_file)
    assert conf["ssl.endpoint.identification.algorithm"] == "https"
    assert conf["acks"] == "all" and conf["enable.idempotence"] is True
    confluent_kafka.Producer(conf).flush(0)  # librdkafka accepts every property
    plain = rdkafka_producer_settings("127.0.0.1:1", client_id="t", settings=_settings(
        tmp_path, CAPLEDGER_KAFKA_SECURITY="plaintext"))
    assert plain["security.protocol"] == "PLAINTEXT" and "sasl.password" not in plain
