"""A node on an institution's own encrypted key: it starts with the passphrase, as its
own Kafka principal, and a second process with the same key refuses to start."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from streams.common.genesis_files import key_path, load_institution_key
from streams.common.keystore import write_encrypted_key
from streams.kafka.topics import ensure_topics
from streams.tools.cluster import LocalCluster, create_chain
from tests.conftest import run_async

pytestmark = pytest.mark.integration

PASSPHRASE = "an institution's own passphrase"
READY_S = 90.0
SECOND_TIMEOUT_S = 60.0
REPO_DIR = Path(__file__).resolve().parents[2]


def test_encrypted_key_node_runs_and_a_second_process_is_refused(
        tmp_path: Path, unique_id: str, kafka_bootstrap: str, stack_settings: Any,
        monkeypatch: pytest.MonkeyPatch) -> None:
    chain = tmp_path / "chain"
    create_chain(chain, chain_id=f"keys-{unique_id}")
    plain = key_path(chain, "koscom")
    write_encrypted_key(chain, "koscom", load_institution_key(chain, "koscom"), PASSPHRASE)
    plain.unlink()  # from here on the key exists only encrypted
    secret = tmp_path / "passphrase"
    secret.write_text(PASSPHRASE + "\n")
    secret.chmod(0o600)
    monkeypatch.setenv("CAPLEDGER_KEY_PASSPHRASE_FILE", str(secret))
    prefix = f"keys.{unique_id}."
    run_async(ensure_topics(kafka_bootstrap, prefix=prefix))
    cluster = LocalCluster(chain, state_dir=tmp_path / "state", topic_prefix=prefix,
                           institutions=("koscom",))
    cluster.start()
    try:
        run_async(cluster.wait_ready(kafka_bootstrap, timeout_s=READY_S))
        log = cluster.log_tail("koscom", 200)
        assert "keystore" not in log and PASSPHRASE not in log
        pid = cluster.nodes["koscom"].pid
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert b"CAPLEDGER_KAFKA_PRINCIPAL=koscom" in environ  # its own Kafka principal
        assert not any(PASSPHRASE.encode() in entry for entry in environ)
        env = {**os.environ, "CAPLEDGER_STATE_DIR": str(tmp_path / "other-state"),
               "CAPLEDGER_KAFKA_PRINCIPAL": "koscom"}
        second = subprocess.run(
            [sys.executable, "-m", "streams", "node", "--institution", "koscom",
             "--genesis", str(chain), "--topic-prefix", prefix],
            capture_output=True, text=True, timeout=SECOND_TIMEOUT_S, env=env, cwd=REPO_DIR,
            check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        assert "key-locked" in second.stderr
        assert cluster.exit_codes()["koscom"] is None  # the first one runs on
        # without the passphrase the key does not open, and the node says why
        env.pop("CAPLEDGER_KEY_PASSPHRASE_FILE", None)
        env.pop("CAPLEDGER_KEY_PASSPHRASE", None)
        third = subprocess.run(
            [sys.executable, "-m", "streams", "node", "--institution", "koscom",
             "--genesis", str(chain), "--topic-prefix", prefix],
            capture_output=True, text=True, timeout=SECOND_TIMEOUT_S, env=env, cwd=REPO_DIR,
            check=False)
        assert third.returncode == 2 and "CAPLEDGER_KEY_PASSPHRASE" in third.stderr
    finally:
        cluster.stop()
