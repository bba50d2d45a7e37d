"""The interfaces at ctxd's edges: what the broker may ask of the parts below it."""

from zope.interface import Attribute, Interface  # type: ignore[import-untyped]


class IJournal(Interface):
    """Where the broker makes every change durable before it acknowledges it.

    Records are JSON-able dicts with an ``"op"`` (ctxd.model); a journal stores a copy.
    Provided by :class:`ctxd.journal.FileJournal` and, for tests,
    :class:`ctxd.testing.MemoryJournal`; tests/test_journal.py runs one set of
    behaviour tests against both.
    """

    snapshot_source = Attribute(
        "None, or a callable returning records that, applied in order to an empty model, rebuild "
        "the state of every record appended so far; a journal that compacts itself snapshots them."
    )
    syncs = Attribute("How many times records were made durable (write and sync) in this run.")
    records_synced = Attribute("How many records were made durable in this run.")
    compactions = Attribute("How many times the journal was compacted in this run.")
    size = Attribute("Bytes the journal takes on its storage now (0 if it keeps none).")

    def load():  # type: ignore[misc]
        """Every record stored, in order, once; then the journal accepts appends.

        Raises :class:`ctxd.journal.JournalCorrupt` for a journal that cannot be trusted.
        """

    def append(record):  # type: ignore[misc,no-untyped-def]
        """Store ``record``; a Deferred that fires once it is durable, or fails with
        :class:`ctxd.journal.JournalFailed` (nothing appended after a failure is
        acknowledged) or :class:`ctxd.journal.JournalClosed`."""

    def barrier():  # type: ignore[misc]
        """A Deferred that fires once every record appended so far is durable."""

    def drain():  # type: ignore[misc]
        """A Deferred that fires once nothing is pending or in flight (for a clean stop)."""

    def close():  # type: ignore[misc]
        """Stop: later appends fail with :class:`ctxd.journal.JournalClosed`."""
