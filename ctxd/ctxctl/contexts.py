"""Contexts by name: ``ctxctl status torque-demo`` where the name is unambiguous.

Ids stay the canonical form: an argument that is a well-formed id is taken as one (without a
request), and every message and output names the id. A name is looked up in ``GET
/v1/contexts``, which lists the contexts the credential may see: a deployer's own, or for the
site admin every context. ``create`` refuses a name its creator already uses (unless told
otherwise), so a deployer's own names stay unambiguous.
"""

from typing import Any, Dict, List

from ctxd import rules, tokens
from ctxd.ctxctl.client import BrokerClient
from ctxd.ctxctl.errors import CliError
from ctxd.ctxctl.render import cell


async def visible_contexts(broker: BrokerClient) -> List[Dict[str, Any]]:
    """The contexts this credential may see (``GET /v1/contexts``), those with a valid id."""
    answer = await broker.call("GET", "/v1/contexts")
    items = answer.get("contexts") if isinstance(answer, dict) else None
    if not isinstance(items, list):
        raise CliError("broker: the answer has no contexts array")
    return [c for c in items if isinstance(c, dict) and rules.is_id(c.get("id"))]


async def context_id(broker: BrokerClient, ref: str) -> str:
    """The id of the context ``ref`` names: ``ref`` itself when it is an id, else the one
    context with that name; a one-line :class:`CliError` when none or several have it."""
    if rules.is_id(ref):
        return ref
    named = [c for c in await visible_contexts(broker) if c.get("name") == ref]
    if not named:
        raise CliError(f"no context named {cell(ref)} (`ctxctl list` shows them)")
    if len(named) > 1:
        raise CliError(f"{len(named)} contexts are named {cell(ref)}: {_ids(named)}; give the id")
    return str(named[0]["id"])


async def refuse_duplicate_name(broker: BrokerClient, name: str) -> None:
    """Before ``create``: a one-line :class:`CliError` when the creator (the site admin, or a
    deployer) has a context named ``name`` already."""
    mine = [c for c in await visible_contexts(broker) if c.get("name") == name and _own(broker, c)]
    if mine:
        which = f"context {mine[0]['id']} has" if len(mine) == 1 else f"contexts {_ids(mine)} have"
        raise CliError(f"{which} the name {cell(name)} already: give the new one another name, or "
                       "--allow-duplicate-name (then give ids, not that name)")


def _own(broker: BrokerClient, context: Dict[str, Any]) -> bool:
    """Whether the caller created ``context``: a deployer sees only its own; the site admin sees
    every context, and its own have no owner."""
    return not broker.token.startswith(tokens.ADMIN) or context.get("owner") is None


def _ids(contexts: List[Dict[str, Any]]) -> str:
    return ", ".join(str(c["id"]) for c in contexts)
