"""How a rank inside a Ray worker finds the agent of its own node.

The rank's Ray node id names its agent actor (``layervault-agent-<node id>``), which knows
the agent's unix socket. The answer is cached per process; it stays right across agent
restarts because the socket path is fixed per node, so a rank's open gRPC channel simply
reconnects to the restarted agent. The cache is dropped when the socket file is gone
(``down`` and ``up`` with another socket directory), or on ``refresh=True``.
"""

from __future__ import annotations

import os
import threading

import ray

from layervault.errors import LayervaultError, UnavailableError
from layervault.ray.naming import COORDINATOR_NAME, NAMESPACE, agent_actor_name

_LOOKUP_S = 60.0
_lock = threading.Lock()
_cache: dict[str, str] = {}  # node id -> agent address


def _still_valid(address: str) -> bool:
    return not address.startswith("unix://") or os.path.exists(address[len("unix://"):])


def agent_address(refresh: bool = False) -> str:
    """The address of the layervault agent on this process's Ray node.

    Raises UnavailableError, naming the node, when no agent actor serves there (layervault
    not deployed, or the node joined after the last ``layervault ray up``).
    """
    if not ray.is_initialized():
        raise UnavailableError("agent_address() works inside a Ray worker or driver (ray.init() not called)")
    node_id = ray.get_runtime_context().get_node_id()
    with _lock:
        cached = _cache.get(node_id)
        if cached and not refresh and _still_valid(cached):
            return cached
    try:
        actor = ray.get_actor(agent_actor_name(node_id), namespace=NAMESPACE)
    except ValueError:
        raise UnavailableError(f"no layervault agent on Ray node {node_id}: run `layervault ray up --storage URL` "
                               "(again, if this node joined the cluster after the last one)") from None
    try:
        address = ray.get(actor.address.remote(), timeout=_LOOKUP_S)
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, LayervaultError):
            raise exc.cause from None
        raise UnavailableError(f"the layervault agent of Ray node {node_id} failed: {exc.cause or exc}") from None
    except ray.exceptions.RayError as exc:  # timed out while Ray restarts it, or gone
        raise UnavailableError(f"the layervault agent of Ray node {node_id} is not reachable: {exc}") from None
    with _lock:
        _cache[node_id] = address
    return address


def deployed_agent_address() -> str | None:
    """``agent_address()`` when layervault is deployed on the connected Ray cluster, else None.

    This is the SDK's hook for ranks that name no agent: outside a layervault deployment,
    Ray users keep the ordinary defaults.
    """
    if not ray.is_initialized():
        return None
    with _lock:
        cached = _cache.get(ray.get_runtime_context().get_node_id())
    if cached and _still_valid(cached):
        return cached
    try:
        ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None
    return agent_address(refresh=True)
