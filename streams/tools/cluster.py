"""A five-institution chain on this machine: genesis files and node processes.

Owns: ``create_chain`` (genesis with identity keys and, optionally, load-generator
allocations) and ``LocalCluster`` (one ``capledger node`` OS process per institution,
started, killed with any signal, paused and resumed individually). The demo, the
failure tests and the benchmark all run real node processes through it.

Touches: the chain directory it is given and the node processes it starts.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from ledger.errors import ValidationError
from ledger.keys import PrivateKey
from ledger.membership import INSTITUTION_IDS, Genesis, SubmitKey
from ledger.script import p2pkh_script
from streams.common import config
from streams.common.clock import now_ms
from streams.common.genesis_files import build_genesis, random_entropy, write_genesis_dir
from streams.kafka import codec
from streams.kafka.logio import LogReader
from streams.kafka.topics import STATUS
from streams.tools.loadgen import Lanes

NODE_STOP_TIMEOUT_S = 15.0
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _parent_death_signal() -> Callable[[], None] | None:
    """What the child runs before exec: SIGTERM when the process that started it dies.

    A test run killed by ``timeout`` or a bench interrupted with SIGKILL would
    otherwise leave five node processes running on the shared broker. Linux only.
    libc is loaded here, in the parent: the child between fork and exec only calls it
    (no import, no lock taken).
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None

    def set_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    return set_signal


def _child_setup() -> Callable[[], None] | None:
    """The parent-death signal is tied to the *thread* that forks: only a child
    started from the main thread gets it, or it would die with a worker thread."""
    if sys.platform != "linux" or threading.current_thread() is not threading.main_thread():
        return None
    return _parent_death_signal()


def node_kafka_env(institution: str, settings: config.Settings) -> dict[str, str]:
    """The environment that makes a node process connect as its institution's own
    principal, with that principal's password file and the CA of the set-up's state
    dir (the node's own CAPLEDGER_STATE_DIR is the cluster's)."""
    return {
        "CAPLEDGER_KAFKA_SECURITY": settings.kafka_security,
        "CAPLEDGER_KAFKA_PRINCIPAL": institution,
        "CAPLEDGER_KAFKA_PASSWORD_FILE": str(settings.kafka_password_file(institution)),
        "CAPLEDGER_KAFKA_CA_FILE": str(settings.kafka_ca_file),
    }
READY_TIMEOUT_S = 120.0  # five node processes starting on two cores take a while


def create_chain(
    directory: Path,
    *,
    chain_id: str,
    lanes: Lanes | None = None,
    block_interval_ms: int = 200,
    proposer_timeout_ms: int = 2_000,
    block_bytes_max: int = 2_000_000,
    issuer_value: int = 0,
    back_offices: tuple[str, ...] = (),
) -> Genesis:
    """Write genesis.json and keys/<institution>.wif under ``directory``.
    ``issuer_value``: native value allocated to each member issuer's identity P2PKH
    script (what the market's issuance spends, decision 0070)."""
    genesis, keys = build_genesis(
        chain_id=chain_id,
        time_ms=now_ms(),
        institutions=INSTITUTION_IDS,
        entropy=random_entropy,
        block_interval_ms=block_interval_ms,
        block_bytes_max=block_bytes_max,
        proposer_timeout_ms=proposer_timeout_ms,
    )
    allocations = list(lanes.allocations()) if lanes is not None else []
    if issuer_value:
        allocations += [(p2pkh_script(m.public_key.hash160), issuer_value)
                        for m in genesis.members if m.may_issue]
    if allocations:
        genesis = dataclasses.replace(genesis, allocations=tuple(allocations))
    if back_offices:
        # Registered systems with their own submit keys (decision 0061), key files
        # keys/<member>-backoffice.wif beside the members'.
        offices = {f"{member}-backoffice": (member, PrivateKey(random_entropy(member, 0)))
                   for member in back_offices}
        genesis = dataclasses.replace(genesis, submit_keys=tuple(
            SubmitKey(name, member, key.public_key) for name, (member, key) in offices.items()))
        keys = {**keys, **{name: key for name, (_, key) in offices.items()}}
    write_genesis_dir(directory, genesis, keys, force=True)
    return genesis


@dataclasses.dataclass
class NodeProcess:
    institution: str
    log_path: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class LocalCluster:
    """The node processes of one chain; every node logs to ``<log_dir>/<id>.log``."""

    def __init__(
        self,
        chain_dir: Path,
        *,
        state_dir: Path,
        topic_prefix: str,
        log_dir: Path | None = None,
        institutions: tuple[str, ...] = INSTITUTION_IDS,
        log_level: str = "info",
        node_env: Mapping[str, Mapping[str, str]] | None = None,
    ) -> None:
        """``node_env``: more environment per institution, applied at each start of that
        node (e.g. its own CAPLEDGER_KAFKA_BOOTSTRAP, a route the network fault tests can
        cut; a metrics port; a clock offset)."""
        self.chain_dir = chain_dir
        self.state_dir = state_dir
        self.topic_prefix = topic_prefix
        self.log_dir = log_dir or state_dir / "logs"
        self.log_level = log_level
        self.node_env = {name: dict(env) for name, env in (node_env or {}).items()}
        # Read now: the children get a CAPLEDGER_STATE_DIR of their own.
        self.kafka_settings = config.load()
        self.nodes = {
            institution: NodeProcess(institution, self.log_dir / f"{institution}.log")
            for institution in institutions
        }

    def start(self, *institutions: str) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        base_env = dict(os.environ, CAPLEDGER_STATE_DIR=str(self.state_dir),
                        PYTHONUNBUFFERED="1")
        for institution in institutions or tuple(self.nodes):
            node = self.nodes[institution]
            if node.alive:
                continue
            env = {**base_env, **node_kafka_env(institution, self.kafka_settings),
                   **self.node_env.get(institution, {})}
            command = [
                sys.executable, "-m", "streams", "node",
                "--institution", institution,
                "--genesis", str(self.chain_dir),
                "--topic-prefix", self.topic_prefix,
                "--log-level", self.log_level,
            ]
            log_file = open(node.log_path, "ab")  # noqa: SIM115 - owned by the child
            node.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                start_new_session=True, preexec_fn=_child_setup(),
            )
            log_file.close()

    def signal(self, institution: str, signum: int) -> None:
        node = self.nodes[institution]
        assert node.process is not None, f"{institution} was never started"
        if node.alive:
            os.kill(node.process.pid, signum)

    def kill(self, institution: str) -> None:
        """``kill -9``: no clean-up, no flush — what a power cut does."""
        self.signal(institution, signal.SIGKILL)
        process = self.nodes[institution].process
        assert process is not None
        process.wait(NODE_STOP_TIMEOUT_S)

    def pause(self, institution: str) -> None:
        self.signal(institution, signal.SIGSTOP)

    def resume(self, institution: str) -> None:
        self.signal(institution, signal.SIGCONT)

    def stop(self, *institutions: str) -> None:
        """SIGTERM, then SIGKILL after a bounded wait."""
        for institution in institutions or tuple(self.nodes):
            node = self.nodes[institution]
            if not node.alive:
                continue
            assert node.process is not None
            os.kill(node.process.pid, signal.SIGCONT)
            node.process.terminate()
        for institution in institutions or tuple(self.nodes):
            process = self.nodes[institution].process
            if process is None:
                continue
            try:
                process.wait(NODE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(NODE_STOP_TIMEOUT_S)

    async def wait_ready(
        self,
        bootstrap: str,
        *,
        timeout_s: float = READY_TIMEOUT_S,
        on_progress: Callable[[set[str]], None] | None = None,
    ) -> None:
        """Until every node has published a heartbeat on the status topic (a node
        reports only once started); a node that exits meanwhile fails at once."""
        reader = LogReader(bootstrap, self.topic_prefix + STATUS.name,
                           client_id="capledger-cluster-ready")
        await reader.start(0)
        seen: set[str] = set()
        deadline = time.monotonic() + timeout_s
        try:
            while seen < set(self.nodes):
                dead = [name for name, code in self.exit_codes().items() if code is not None]
                if dead:
                    raise RuntimeError(f"node {dead[0]} exited ({self.exit_codes()[dead[0]]}) "
                                       f"while starting:\n{self.log_tail(dead[0])}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"no heartbeat within {timeout_s} s from "
                                       f"{sorted(set(self.nodes) - seen)}")
                before = len(seen)
                for record in await reader.read(timeout_ms=200):
                    with contextlib.suppress(ValidationError):
                        decoded = codec.decode(record.value, expected="NodeStatusReported")
                        seen.add(str(decoded.record["institution"]))
                seen &= set(self.nodes)
                if on_progress is not None and len(seen) != before:
                    on_progress(set(seen))
        finally:
            await reader.stop()

    def exit_codes(self) -> dict[str, int | None]:
        return {
            name: (None if node.process is None else node.process.poll())
            for name, node in self.nodes.items()
        }

    def log_tail(self, institution: str, lines: int = 40) -> str:
        path = self.nodes[institution].log_path
        if not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
