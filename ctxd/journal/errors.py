"""The journal's errors."""


class JournalCorrupt(Exception):
    """The journal is damaged somewhere other than its tail (or is not a journal)."""


class JournalFailed(Exception):
    """A write or sync failed: nothing after it may be acknowledged."""


class JournalClosed(JournalFailed):
    """The journal was closed (shutdown): not a disk failure."""
