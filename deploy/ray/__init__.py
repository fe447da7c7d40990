"""layervault on Ray: one agent actor per Ray node and one coordinator actor, and ranks
(Ray Train workers, actors, tasks) that find their node's agent by themselves.

    import ray, layervault.ray
    ray.init(address="auto")
    layervault.ray.up(storage="s3://bucket/ckpt", env={"AWS_ENDPOINT_URL": ...})   # or: layervault ray up
    ...  # ranks: ModelManager(config) with no agent= finds the agent of their node
    layervault.ray.down()

``up()`` is re-runnable: run it again after nodes join, and it adds their agents.
"""

try:
    import ray  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the installation
    raise ImportError("layervault.ray needs Ray: pip install 'layervault[ray]'") from exc

from layervault.ray.actors import AgentInfo, CoordinatorInfo
from layervault.ray.deployment import AgentStatus, DeploymentStatus, down, status, up
from layervault.ray.discovery import agent_address, deployed_agent_address
from layervault.ray.naming import NAMESPACE, agent_actor_name
from layervault.ray.options import ServiceOptions

__all__ = [
    "up",
    "down",
    "status",
    "agent_address",
    "deployed_agent_address",
    "agent_actor_name",
    "NAMESPACE",
    "ServiceOptions",
    "DeploymentStatus",
    "AgentStatus",
    "AgentInfo",
    "CoordinatorInfo",
]
