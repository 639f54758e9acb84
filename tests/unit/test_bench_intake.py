"""The intake benchmark runs the node's own intake functions and checks what it measures."""

from __future__ import annotations

import pytest

from streams.tools.bench_core import bench_intake

pytestmark = pytest.mark.unit


def test_intake_bench_pre_verifies_every_record() -> None:
    figures = bench_intake(200, lanes=20)
    assert figures["records"] == 200
    assert figures["cpu_us_per_tx"] > 0


def test_intake_bench_with_two_verify_threads_pre_verifies_every_record() -> None:
    figures = bench_intake(200, lanes=20, workers=2)
    assert figures["workers"] == 2 and figures["wall_us_per_tx"] > 0


def test_intake_bench_with_a_worker_process_reports_its_share_and_the_waits() -> None:
    """Decision 0126: with ``--verify-processes`` the figures split the CPU between the
    node's thread and the worker, and say how long the node waited for answers and
    how long each was kept from a core by other processes."""
    figures = bench_intake(600, lanes=60, workers=2, processes=True)
    assert 0 < figures["share_verified_by_worker_processes"] <= 1  # the worker verified
    assert figures["worker_processes_cpu_us_per_tx"] > 0
    for key in ("node_thread_wait_us_per_tx", "node_thread_runqueue_us_per_tx",
                "worker_processes_runqueue_us_per_tx"):
        assert figures[key] >= 0, key


def test_paired_intake_bench_times_both_sides_on_the_same_records() -> None:
    """``bench intake --paired`` (decision 0126): one verifier and two, call by call;
    each pool pre-verifies every record (the bench asserts it) and both are timed."""
    from streams.tools.bench_core import bench_intake_paired

    figures = bench_intake_paired(300, lanes=30, workers=2, batch=100, processes=True)
    assert figures["one_wall_us_per_tx"] > 0 and figures["workers_wall_us_per_tx"] > 0
    assert figures["speedup"] == pytest.approx(
        figures["one_wall_us_per_tx"] / figures["workers_wall_us_per_tx"])
    assert figures["median_call_speedup"] > 0


def test_node_bench_commits_every_payment_of_a_mixed_load() -> None:
    from streams.tools.bench_node import bench_node

    figures = bench_node(150, workers=2, mix="mixed")
    assert figures["txs"] == 150 and figures["heights"] >= 1
    assert set(figures["node_cpu_us_per_tx"]) == {"otc-operator", "surveillance", "koscom",
                                                  "securities-a", "securities-b"}
    assert figures["ratio_to_verify"] > 1  # a node does at least one verification per tx


@pytest.mark.parametrize(("mix", "batch"), [("oap", 1), ("p2pkh", 40), ("oap", 25)])
def test_node_bench_commits_every_payment_in_batches_and_oap(mix: str, batch: int) -> None:
    """Decision 0112: batch records and Open Assets transfers commit in full (the
    bench raises when some transaction is never decided) in fewer records."""
    from streams.tools.bench_node import bench_node

    figures = bench_node(150, mix=mix, batch=batch)
    assert (figures["txs"], figures["mix"], figures["batch"]) == (150, mix, batch)
    assert figures["heights"] >= 1 and figures["ratio_to_verify"] > 1


def test_the_varied_verification_unit_times_distinct_valid_inputs() -> None:
    """The unit over distinct inputs checks that each of its signatures verifies (a
    refused one would time another path) and gives a CPU time per verification."""
    from streams.tools.bench_core import VARIED_VERIFY_INPUTS, varied_verify_cpu_us

    assert VARIED_VERIFY_INPUTS >= 100
    assert 0 < varied_verify_cpu_us(count=VARIED_VERIFY_INPUTS) < 10_000


def test_intake_bench_runs_the_collector_as_a_node_does_and_leaves_it_as_found(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Decision 0130: the calls are timed under the node's collector regime (everything
    frozen before the first call and after each, ``BlockFreezer.block_done``), and the
    frozen objects go back into the collector's view when the bench ends (all of them:
    ``gc.unfreeze`` has no finer grain)."""
    import gc

    from streams.common import collector

    done: list[int] = []
    original = collector.BlockFreezer.block_done

    def counting(self: collector.BlockFreezer) -> None:
        done.append(gc.get_freeze_count())
        original(self)

    monkeypatch.setattr(collector.BlockFreezer, "block_done", counting)
    bench_intake(300, lanes=30, batch=100)
    assert len(done) == 3  # one per intake call
    assert all(count > 0 for count in done)  # the set-up was frozen before the calls
    assert gc.get_freeze_count() == 0
