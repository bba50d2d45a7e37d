"""The journal: every state change, durable before it is acknowledged.

- :mod:`~ctxd.journal.format` - the on-disk format: frames, scanning, damage, snapshots;
- :mod:`~ctxd.journal.filejournal` - :class:`FileJournal`, group commit and compaction;
- ``python -m ctxd.journal check|dump STATE_DIR`` (:mod:`~ctxd.journal.__main__`) - offline inspection.

The broker sees a journal only through :class:`ctxd.interfaces.IJournal`;
:class:`ctxd.testing.MemoryJournal` is the in-memory one tests use. docs/reliability.md
describes the format and the rules of replay and compaction.
"""

from ctxd.journal.errors import JournalClosed, JournalCorrupt, JournalFailed
from ctxd.journal.filejournal import FileJournal
from ctxd.journal.format import JOURNAL_FILE

__all__ = ["JOURNAL_FILE", "FileJournal", "JournalClosed", "JournalCorrupt", "JournalFailed"]
