"""A full disk under a node (issue 9): one node's directory is a real 1 MiB tmpfs,
filled to the last byte while the chain runs. Expected: that node stops appending and
says so (log line ``DISK FULL``, ``capledger_node_disk_full`` 1, ``/readyz`` 503
``disk-full``, its heartbeat's condition ``disk-full``, which ``capledger status``
shows as DISK-FULL) without exiting; its chain copy holds no torn record; the other four go
on; when space returns it resumes by itself, takes the heights it missed and agrees,
every tx exactly once. Needs root (mount); skipped otherwise, saying so. Figures:
docs/failure-tests.md.

Owns: nothing but the test (and the tmpfs it mounts under ``tmp_path``).
"""

from __future__ import annotations

import contextlib
import errno
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ledger.membership import INSTITUTION_IDS
from streams.kafka.topics import STATUS
from tests.integration.cluster_fixtures import ChainRun, chain_records, read_log, running_chain
from tests.integration.ops_fixtures import Probe, free_port, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.cluster]

FULL = "surveillance"
TMPFS_SIZE = "1m"
FILL_CHUNK_BYTES = 64 * 1024
COMMIT_TIMEOUT_S = 40.0
FULL_SEEN_TIMEOUT_S = 30.0
RECOVERY_TIMEOUT_S = 60.0


@contextlib.contextmanager
def small_filesystem(directory: Path) -> Iterator[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={TMPFS_SIZE}", "tmpfs",
                              str(directory)], capture_output=True, text=True, check=False)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a size-limited tmpfs here: {mounted.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill(directory: Path) -> Path:
    """Write a filler file until the filesystem refuses another byte."""
    filler = directory / "filler.bin"
    with open(filler, "wb", buffering=0) as handle:
        chunk = b"\0" * FILL_CHUNK_BYTES
        while True:
            try:
                handle.write(chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC, error
                if len(chunk) == 1:
                    return filler
                chunk = chunk[: len(chunk) // 2]


async def _condition_is(run: ChainRun, wanted: str) -> str | None:
    """None when FULL's latest heartbeat carries condition ``wanted``."""
    beats = [r for r in await read_log(run.bootstrap, run.topic(STATUS.name),
                                       "NodeStatusReported") if r["institution"] == FULL]
    latest = beats[-1]["condition"] if beats else None
    return None if latest == wanted else f"latest heartbeat condition {latest!r}"


async def test_node_on_a_full_disk_stops_appending_and_resumes(
    tmp_path: Path, unique_id: str, kafka_bootstrap: str
) -> None:
    chain_id = f"fail-{unique_id[-12:]}"  # as running_chain names it
    node_dir = tmp_path / "state" / "nodes" / chain_id / FULL
    ports = {name: free_port() for name in INSTITUTION_IDS}
    env = {name: {"CAPLEDGER_METRICS_PORT": str(port)} for name, port in ports.items()}
    with small_filesystem(node_dir):
        async with running_chain(tmp_path, unique_id, kafka_bootstrap, node_env=env) as run:
            assert run.genesis.chain_id == chain_id
            probe = Probe(ports[FULL])
            await run.submit(run.next_batch(2))
            await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
            await run.wait_agreement(INSTITUTION_IDS, timeout_s=COMMIT_TIMEOUT_S)

            filler = fill(node_dir)
            full_at = run.blocks.head_height
            for _ in range(3):  # heights the full node cannot append
                await run.submit(run.next_batch(2))
                await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)

            async def says_full() -> str | None:
                samples = await probe.metrics()
                status, body = await probe.get("/readyz")
                if samples["capledger_node_disk_full"] != 1 or status != 503:
                    return f"disk_full {samples['capledger_node_disk_full']}, readyz {status}"
                assert body.strip() == "not-ready: disk-full", body
                return None

            await wait_for(says_full, timeout_s=FULL_SEEN_TIMEOUT_S, what="node says disk full")
            await wait_for(lambda: _condition_is(run, "disk-full"),
                           timeout_s=FULL_SEEN_TIMEOUT_S, what="heartbeat says disk-full")
            assert run.cluster.nodes[FULL].alive, "the node exited on a full disk"
            assert "DISK FULL" in run.cluster.log_tail(FULL, 400)
            copy = chain_records(node_dir / "chain.dat")  # CRC-checked, no torn tail
            assert len(copy) <= full_at + 1, (len(copy), full_at)
            missed = run.blocks.head_height - len(copy)
            assert missed >= 2, f"the full node appended on: {len(copy)} of {full_at}"

            filler.unlink()
            freed = time.monotonic()
            await run.submit(run.next_batch(1))
            await run.wait_committed(run.submitted, timeout_s=COMMIT_TIMEOUT_S)
            await run.wait_agreement(INSTITUTION_IDS, timeout_s=RECOVERY_TIMEOUT_S)
            recovery_s = time.monotonic() - freed
            await wait_for(lambda: _condition_is(run, ""), timeout_s=FULL_SEEN_TIMEOUT_S,
                           what="heartbeat condition cleared")
            samples = await probe.metrics()
            assert samples["capledger_node_disk_full"] == 0
            assert samples["capledger_node_disk_full_events_total"] >= 1
            copy = chain_records(node_dir / "chain.dat")
            assert len(copy) == run.blocks.head_height
            assert run.cluster.exit_codes()[FULL] is None
            run.assert_exactly_once()
            print(f"\nfull disk: {missed} heights missed while full; agreed again "
                  f"{recovery_s:.2f} s after space returned; chain copy {len(copy)} records")
