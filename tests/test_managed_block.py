"""Managed blocks in hosts and known_hosts files: one behaviour, one table, run against
the agent's copy (ctxagent.py) and ctxctl's (ctxd/ctxctl/render.py)."""

import pytest

import ctxagent
from ctxd.ctxctl import render

CID = "Q2x1c3Rlci1pZC0xMjM0NT"
OTHER = "T3RoZXItY29udGV4dC0xMj"
BEGIN = f"# BEGIN ctxd (context {CID})"
END = f"# END ctxd (context {CID})"


def block(cid, *lines):
    return "".join([f"# BEGIN ctxd (context {cid})\n", *(line + "\n" for line in lines),
                    f"# END ctxd (context {cid})\n"])


IMPLEMENTATIONS = [ctxagent.replace_managed_block, render.replace_managed_block]

# (what it shows, text before, new lines, text after)
TABLE = [
    ("appended to an empty file", "", ["x"], block(CID, "x")),
    ("appended after a file without a final newline", "a\r\nb", ["x"], "a\r\nb\n" + block(CID, "x")),
    ("replaced in place", "head\n" + block(CID, "old 1", "old 2") + "tail\n", ["new"],
     "head\n" + block(CID, "new") + "tail\n"),
    ("unchanged when nothing changed", "head\n" + block(CID, "new") + "tail\n", ["new"],
     "head\n" + block(CID, "new") + "tail\n"),
    ("markers with CRLF endings are ours", f"a\r\n{BEGIN}\r\nold\r\n{END}\r\nb\r\n", ["new"],
     "a\r\n" + block(CID, "new") + "b\r\n"),
    ("another context's block is left alone", "base\n" + block(OTHER, "b") + block(CID, "a"), ["c"],
     "base\n" + block(OTHER, "b") + block(CID, "c")),
    ("no lines remove the block", "a\n" + block(CID, "x") + "b\n", [], "a\nb\n"),
    ("no lines and no block change nothing", "a\nb", [], "a\nb"),
    ("a repeated block is merged into the first", "a\n" + block(CID, "x") + "b\n" + block(CID, "y") + "c\n",
     ["z"], "a\n" + block(CID, "z") + "b\nc\n"),
    ("repeated blocks all go with no lines", "a\n" + block(CID, "x") + "b\n" + block(CID, "y") + "c\n",
     [], "a\nb\nc\n"),
    ("a marker-like line with more text is content", f"{BEGIN} (copy)\n", ["x"], f"{BEGIN} (copy)\n" + block(CID, "x")),
    ("non-ASCII content is kept", "caf\xe9\n", ["x"], "caf\xe9\n" + block(CID, "x")),
]

DAMAGED = [
    ("a BEGIN without its END", f"{BEGIN}\nx\n"),
    ("an END without its BEGIN", f"x\n{END}\n"),
    ("an END before its BEGIN", f"{END}\n{BEGIN}\n"),
    ("a BEGIN inside the block", f"{BEGIN}\n{BEGIN}\nx\n{END}\n"),
    ("a second BEGIN after a complete block", block(CID, "x") + f"{BEGIN}\n"),
    ("a stray END after a complete block", block(CID, "x") + f"{END}\n"),
]


@pytest.mark.parametrize("replace", IMPLEMENTATIONS, ids=["agent", "ctxctl"])
@pytest.mark.parametrize("what, before, lines, after", TABLE, ids=[row[0] for row in TABLE])
def test_block_table(replace, what, before, lines, after):
    """Both implementations turn each text into exactly the same result."""
    assert replace(before, CID, lines) == after


@pytest.mark.parametrize("replace", IMPLEMENTATIONS, ids=["agent", "ctxctl"])
@pytest.mark.parametrize("what, before", DAMAGED, ids=[row[0] for row in DAMAGED])
def test_damaged_markers_are_refused(replace, what, before):
    """Damaged markers are refused rather than guessed at, by both."""
    with pytest.raises(ValueError, match="ctxd \\(context"):
        replace(before, CID, ["y"])


@pytest.mark.parametrize("replace", IMPLEMENTATIONS, ids=["agent", "ctxctl"])
def test_blocks_of_two_contexts_are_independent(replace):
    """Three updates of two contexts leave one block of each, each with its last lines."""
    text = replace("base\n", CID, ["a"])
    text = replace(text, OTHER, ["b"])
    text = replace(text, CID, ["c"])
    assert text == "base\n" + block(CID, "c") + block(OTHER, "b")
