"""The time rules of a proposed block: later than its parent, close to the validator's clock.

Owns: ``check_block_time`` (pure: the validator's clock is passed in) and the bounds
(docs/decisions/0050-no-record-stops-the-ledger.md), and ``proposal_time_ms``, the
time an honest proposer writes. Why it matters: every later block must be later than
its parent, so one block dated far in the future would make every honest proposal
after it invalid and halt the chain; a block dated far in the past would let a
proposer backdate transactions. Only proposals are checked (a nack with the code);
a certified block read back (chain copy, blocks log) is not: a clock at replay time
says nothing about the time of the vote, and blocks certified before this rule
existed must still load.
"""

from __future__ import annotations

from ledger.errors import BlockError

# A proposal may be this far ahead of a validator's clock (clock skew between
# institutions; NTP keeps it to milliseconds).
BLOCK_TIME_FUTURE_MS_MAX = 10_000
# ...and this far behind it (a proposal validated late: a busy or catching-up node).
BLOCK_TIME_PAST_MS_MAX = 120_000


def proposal_time_ms(*, now_ms: int, parent_time_ms: int) -> int:
    """The time an honest proposer writes: its clock, but always after the parent."""
    return max(now_ms, parent_time_ms + 1)


def check_block_time(
    time_ms: int,
    *,
    parent_time_ms: int,
    now_ms: int,
    future_ms_max: int = BLOCK_TIME_FUTURE_MS_MAX,
    past_ms_max: int = BLOCK_TIME_PAST_MS_MAX,
) -> None:
    """Raise ``BlockError`` with a specific code unless ``time_ms`` is after the
    parent's time and within [now - past_ms_max, now + future_ms_max]."""
    if time_ms <= parent_time_ms:
        raise BlockError(
            f"block time {time_ms} ms is not after its parent's {parent_time_ms} ms",
            code="block-time-not-after-parent",
        )
    if time_ms > now_ms + future_ms_max:
        raise BlockError(
            f"block time {time_ms} ms is {time_ms - now_ms} ms ahead of this validator's "
            f"clock (at most {future_ms_max} ms)",
            code="block-time-future",
        )
    if time_ms < now_ms - past_ms_max:
        raise BlockError(
            f"block time {time_ms} ms is {now_ms - time_ms} ms behind this validator's "
            f"clock (at most {past_ms_max} ms)",
            code="block-time-past",
        )

