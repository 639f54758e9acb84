"""The node's overheads around its handlers (decision 0111): the tx reader's fetch
batching switch and the root logger faust leaves at DEBUG for its spinner."""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace

import pytest
from aiokafka.consumer.fetcher import Fetcher
from faust.utils.terminal import Spinner, SpinnerHandler

from streams.kafka.logio import (
    FETCH_MIN_BYTES_DEFAULT,
    FETCH_WAIT_MS_DEFAULT,
    FetchBatching,
    LogReader,
)
from streams.node.app import drop_spinner_logging
from streams.node.ledger_node import TX_FETCH_BATCHING

pytestmark = pytest.mark.unit


def test_aiokafka_still_builds_fetch_requests_from_the_two_attributes_switched() -> None:
    # LogReader._batch_fetches sets these on the live fetcher; a rename in a new
    # aiokafka would silently keep every fetch immediate.
    init = inspect.getsource(Fetcher.__init__)
    build = inspect.getsource(Fetcher._get_actions_per_node)
    for name in ("_fetch_min_bytes", "_fetch_max_wait_ms"):
        assert f"self.{name} = " in init and f"self.{name}" in build, name


def _reader_with_fake_fetcher(batching: FetchBatching) -> tuple[LogReader, SimpleNamespace]:
    reader = LogReader.__new__(LogReader)
    fetcher = SimpleNamespace(_fetch_min_bytes=FETCH_MIN_BYTES_DEFAULT,
                              _fetch_max_wait_ms=FETCH_WAIT_MS_DEFAULT)
    reader._consumer = SimpleNamespace(_fetcher=fetcher)  # type: ignore[assignment]
    reader._batching = batching
    reader._batched = False
    return reader, fetcher


def test_fetches_are_batched_while_records_flow_and_immediate_again_after() -> None:
    batching = FetchBatching(min_bytes=65_536, max_wait_ms=20, records_min=2)
    reader, fetcher = _reader_with_fake_fetcher(batching)
    reader._batch_fetches(True)
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (65_536, 20)
    reader._batch_fetches(True)  # no change
    assert reader._batched
    reader._batch_fetches(False)
    assert (fetcher._fetch_min_bytes, fetcher._fetch_max_wait_ms) == (
        FETCH_MIN_BYTES_DEFAULT, FETCH_WAIT_MS_DEFAULT)
    assert not reader._batched


def test_the_node_batches_only_a_short_wait_on_its_tx_log() -> None:
    # The wait is added to intake at most once per fetch: keep it well under the
    # latency budget (decision 0111); one record a read must not switch it on.
    assert TX_FETCH_BATCHING.max_wait_ms <= 25
    assert TX_FETCH_BATCHING.records_min >= 2


def _root_like(handler_level: int) -> logging.Logger:
    root = logging.Logger("test-root", logging.DEBUG)  # what faust leaves behind
    printing = logging.StreamHandler()
    printing.setLevel(handler_level)
    root.addHandler(printing)
    root.addHandler(SpinnerHandler(Spinner(), level=logging.DEBUG))
    return root


def test_the_spinner_handler_goes_and_the_root_level_returns_to_the_printed_one() -> None:
    root = _root_like(logging.WARNING)
    assert root.isEnabledFor(logging.DEBUG)
    assert drop_spinner_logging(root)
    assert not any(isinstance(h, SpinnerHandler) for h in root.handlers)
    assert len(root.handlers) == 1
    assert root.level == logging.WARNING and not root.isEnabledFor(logging.INFO)
    assert not drop_spinner_logging(root)  # once only


def test_a_debug_log_level_keeps_debug_records() -> None:
    root = _root_like(logging.DEBUG)
    assert drop_spinner_logging(root)
    assert root.isEnabledFor(logging.DEBUG)


def test_a_handler_without_level_leaves_the_root_alone() -> None:
    root = _root_like(logging.NOTSET)
    assert not drop_spinner_logging(root)
    assert root.level == logging.DEBUG
