"""Test doubles of ctxd's own interfaces, for the tests of what sits above them."""

import json
from typing import Any, Callable, List, Optional

from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer  # type: ignore[import-untyped]

from ctxd.interfaces import IJournal
from ctxd.journal import JournalClosed, JournalFailed
from ctxd.journal.format import Record, encode


@implementer(IJournal)
class MemoryJournal:
    """A journal that keeps records in a list and makes each durable at once.

    ``records`` (a list of records, e.g. another MemoryJournal's) are what :meth:`load`
    finds, as if a file journal were opened again. :meth:`fail` makes it behave like a
    file journal whose disk failed.
    """

    def __init__(self, records: Optional[List[Record]] = None) -> None:
        self.records: List[Record] = list(records or [])
        self.snapshot_source: Optional[Callable[[], List[Record]]] = None
        self.syncs = 0
        self.records_synced = 0
        self.compactions = 0
        self.size = 0
        self._failure: Optional[Exception] = None

    def load(self) -> Any:
        return iter(list(self.records))

    def append(self, record: Record) -> Deferred:
        if self._failure is not None:
            return fail(self._failure)
        # What a file journal stores: the record's JSON encoding, decoded again.
        self.records.append(json.loads(encode(record)))
        self.syncs += 1
        self.records_synced += 1
        return succeed(None)

    def barrier(self) -> Deferred:
        if self._failure is not None and not isinstance(self._failure, JournalClosed):
            return fail(JournalFailed(str(self._failure)))
        return succeed(None)

    def drain(self) -> Deferred:
        return succeed(None)

    def close(self) -> None:
        if self._failure is None:
            self._failure = JournalClosed("the journal is closed")

    def fail(self, error: Exception) -> None:
        """From now on, appends and barriers fail as after a failed sync."""
        self._failure = JournalFailed(str(error))
