"""Click options shared by several ``capledger`` commands, declared once."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ledger.errors import ValidationError
from streams.kafka.topics import TOPIC_PREFIX_ENV, check_topic_prefix

F = TypeVar("F", bound=Callable[..., Any])


def _checked_topic_prefix(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    try:
        return check_topic_prefix(value)
    except ValidationError as error:
        raise click.BadParameter(error.message) from None


def topic_prefix_option(function: F) -> F:
    """``--topic-prefix P`` (default ``$CAPLEDGER_TOPIC_PREFIX``, else none), checked:
    a non-empty prefix must end with a dot; a bad one exits with USAGE (2)."""
    option = click.option(
        "--topic-prefix",
        default=lambda: os.environ.get(TOPIC_PREFIX_ENV, ""),
        callback=_checked_topic_prefix,
        help=f"Prefix of every topic name, ending with a dot (isolates chains on one "
             f"broker; as the nodes were started with). Default ${TOPIC_PREFIX_ENV}.",
    )
    return option(function)


def metrics_options(function: F) -> F:
    """``--metrics-port N`` (default ``$CAPLEDGER_METRICS_PORT``; 0 or unset: off) and
    ``--metrics-host H`` (default ``$CAPLEDGER_METRICS_HOST``, else 127.0.0.1): where a
    long-running process serves /metrics, /healthz and /readyz (decision 0102)."""
    port = click.option(
        "--metrics-port", type=click.IntRange(0, 65535), default=None,
        help="Serve /metrics, /healthz and /readyz on this port (default "
             "$CAPLEDGER_METRICS_PORT; 0 or unset: off).")
    host = click.option(
        "--metrics-host", default=None,
        help="Address of the metrics port (default $CAPLEDGER_METRICS_HOST, else 127.0.0.1).")
    return port(host(function))
