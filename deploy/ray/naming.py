"""Names that tie layervault's Ray actors together.

Every process of a Ray cluster (``layervault ray up``, the actors, the ranks) finds the
services by these names alone: one detached coordinator actor and one agent actor per Ray
node, all in the ``layervault`` namespace, whatever namespace the training job uses.
"""

from __future__ import annotations

import os
import pathlib

NAMESPACE = "layervault"
COORDINATOR_NAME = "layervault-coordinator"
AGENT_NAME_PREFIX = "layervault-agent-"

# sun_path holds 108 bytes including the terminating NUL.
_MAX_SOCKET_PATH = 107


def agent_actor_name(node_id: str) -> str:
    """The agent actor of the Ray node ``node_id`` (hex, as ``ray.nodes()`` reports it)."""
    return AGENT_NAME_PREFIX + node_id


def node_of_agent(actor_name: str) -> str | None:
    """The node id an agent actor's name carries, or None for other names."""
    return actor_name[len(AGENT_NAME_PREFIX):] if actor_name.startswith(AGENT_NAME_PREFIX) else None


def default_socket_dir() -> str:
    """Where agent actors put their sockets unless told otherwise (evaluated on the node)."""
    return f"/tmp/layervault-{os.getuid()}/ray"


def agent_socket_path(socket_dir: str, node_id: str) -> str:
    """The unix socket of one node's agent.

    It carries the node id because several Ray nodes may share one machine (a local test
    cluster, or several raylets per host), and it is the same on every restart of that
    node's agent, so a rank's open channel reconnects by itself.
    """
    path = str(pathlib.Path(socket_dir) / f"agent-{node_id[:16]}.sock")
    if len(path.encode()) > _MAX_SOCKET_PATH:
        raise ValueError(f"agent socket path {path!r} is longer than the {_MAX_SOCKET_PATH} bytes a unix socket "
                         "may have; choose a shorter socket directory")
    return path
