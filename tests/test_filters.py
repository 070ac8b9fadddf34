"""Every filter decides, for every node operation, to handle it or to pass it through.

A filter that silently passed an operation it should intercept would corrupt a backup the day
the operation is added; so the list of operations is checked against the Node class itself, and
each filter against the list.
"""

from __future__ import annotations

import inspect

import pytest

from blockfs.jobs.backup import CopyBeforeWriteFilter
from blockfs.jobs.mirror import MirrorFilter
from blockfs.jobs.stream import StreamFilter
from blockfs.nodes.base import Node
from blockfs.nodes.filter import NODE_OPERATIONS, FilterNode, WriteNotifyFilter
from blockfs.nodes.inject import InjectFilter
from blockfs.nodes.retry import RetryFilter

FILTERS = [
    CopyBeforeWriteFilter, InjectFilter, MirrorFilter, RetryFilter, StreamFilter,
    WriteNotifyFilter,
]  # fmt: skip


def test_operation_list_matches_the_node_interface() -> None:
    public_async = {
        name
        for name, fn in inspect.getmembers(Node, inspect.iscoroutinefunction)
        if not name.startswith("_")
    }
    assert public_async == set(NODE_OPERATIONS)


def test_every_filter_subclass_is_listed_here() -> None:
    assert {c for c in FilterNode.__subclasses__()} <= set(FILTERS)


@pytest.mark.parametrize("cls", FILTERS, ids=lambda c: c.__name__)
def test_filter_covers_every_operation(cls: type[FilterNode]) -> None:
    handled = {name for name in NODE_OPERATIONS if name in cls.__dict__}
    passed = set(cls.passes_through)
    assert not handled & passed, f"{cls.__name__} both handles and passes {handled & passed}"
    missing = set(NODE_OPERATIONS) - handled - passed
    assert not missing, f"{cls.__name__} neither handles nor passes through {sorted(missing)}"
