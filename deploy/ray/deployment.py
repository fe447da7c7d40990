"""Bringing layervault up and down on a Ray cluster (``layervault ray up|down|status``).

``up()`` reconciles, so it is safe to run again at any time, and is how nodes that joined
later get their agent:

- the coordinator actor is created unless one already serves with the same settings (other
  settings are refused: ``down()`` first);
- every alive node without an agent actor gets one, pinned to it (hard node affinity);
- agent actors of nodes that are gone are removed;
- agent actors that report to another coordinator address than the current one (the
  coordinator came back on another port or node) are restarted, and read the new address
  as they start.

All actors are detached, restart without limit (``max_restarts=-1``) and need no CPU, so
they outlive the driver that ran ``up()`` and never take a slot from training workers.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from layervault.errors import InvalidArgumentError, LayervaultError, UnavailableError
from layervault.ray.actors import AgentActor, AgentInfo, CoordinatorActor, CoordinatorInfo
from layervault.ray.naming import COORDINATOR_NAME, NAMESPACE, agent_actor_name, node_of_agent
from layervault.ray.options import ServiceOptions

_HEAD_RESOURCE = "node:__internal_head__"
# What up() takes as keyword settings: every ServiceOptions field but the two it sets itself.
_SETTINGS = {f.name for f in dataclasses.fields(ServiceOptions)} - {"storage", "env_names"}


@dataclasses.dataclass(frozen=True)
class AgentStatus:
    node_id: str
    node_alive: bool
    info: AgentInfo | None      # None when the agent does not answer
    problem: str = ""           # why it does not serve; "" when it does


@dataclasses.dataclass(frozen=True)
class DeploymentStatus:
    coordinator: CoordinatorInfo | None
    coordinator_problem: str
    agents: tuple[AgentStatus, ...]
    nodes_without_agent: tuple[str, ...]   # alive nodes that joined after the last up()

    @property
    def deployed(self) -> bool:
        return self.coordinator is not None or bool(self.coordinator_problem) or bool(self.agents)

    @property
    def healthy(self) -> bool:
        return (self.coordinator is not None and not self.nodes_without_agent
                and all(a.info is not None and not a.problem for a in self.agents))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready; environment variable values are never part of it, only their names."""
        return dataclasses.asdict(self) | {"deployed": self.deployed, "healthy": self.healthy}


def _require_ray() -> None:
    if not ray.is_initialized():
        raise UnavailableError("not connected to a Ray cluster: call ray.init(address=...) first "
                               "(or pass --address to `layervault ray`)")


class _NodeGone(UnavailableError):
    """The actor is pinned to a node that no longer exists (Ray notices a removed node only after a while)."""


def _get(ref: ray.ObjectRef, timeout: float, what: str) -> Any:
    """``ray.get`` that raises layervault errors: the actor's own, or UnavailableError naming ``what``."""
    try:
        return ray.get(ref, timeout=timeout)
    except ray.exceptions.ActorUnschedulableError:
        raise _NodeGone(f"{what} cannot run: its node is gone") from None
    except ray.exceptions.RayTaskError as exc:
        if isinstance(exc.cause, LayervaultError):
            raise exc.cause from None
        raise UnavailableError(f"{what} failed: {exc.cause or exc}") from None
    except ray.exceptions.GetTimeoutError:
        raise UnavailableError(f"{what} did not answer within {timeout:.0f}s (still starting or restarting?)") from None
    except ray.exceptions.RayActorError as exc:
        raise UnavailableError(f"{what} is gone: {exc}") from None


def _nodes() -> dict[str, dict]:
    return {n["NodeID"]: n for n in ray.nodes()}


def _agent_actors() -> dict[str, ray.actor.ActorHandle]:
    """node id -> agent actor, for every agent actor Ray knows (also of nodes that are gone)."""
    found = {}
    for entry in ray.util.list_named_actors(all_namespaces=True):
        node_id = node_of_agent(entry["name"]) if entry["namespace"] == NAMESPACE else None
        if node_id:
            try:
                found[node_id] = ray.get_actor(entry["name"], namespace=NAMESPACE)
            except ValueError:  # removed meanwhile
                pass
    return found


def _coordinator_actor() -> ray.actor.ActorHandle | None:
    try:
        return ray.get_actor(COORDINATOR_NAME, namespace=NAMESPACE)
    except ValueError:
        return None


def _service_options(name: str, env: Mapping[str, str], strategy: NodeAffinitySchedulingStrategy | None) -> dict:
    options: dict[str, Any] = dict(name=name, namespace=NAMESPACE, lifetime="detached", max_restarts=-1,
                                   max_task_retries=-1, num_cpus=0)
    if strategy is not None:
        options["scheduling_strategy"] = strategy
    if env:
        options["runtime_env"] = {"env_vars": dict(env)}
    return options


def _remove(actors: list[ray.actor.ActorHandle], grace: float) -> None:
    """Stop the services inside gracefully (all at once, bounded by ``grace``), then end the actors for good."""
    stops = [actor.stop.remote(grace) for actor in actors]
    deadline = time.monotonic() + grace + 10
    for stop in stops:
        try:
            ray.get(stop, timeout=max(0.1, deadline - time.monotonic()))
        except (ray.exceptions.RayError, LayervaultError):
            pass  # dead, restarting or stuck: the kill below ends it either way
    for actor in actors:
        ray.kill(actor, no_restart=True)


def _wait_names_released(names: set[str], timeout: float) -> None:
    """Ray frees an ended actor's name asynchronously; a following up() must be able to reuse it."""
    deadline = time.monotonic() + timeout
    names = set(names)
    while names:
        present = {e["name"] for e in ray.util.list_named_actors(all_namespaces=True) if e["namespace"] == NAMESPACE}
        names &= present
        if not names:
            return
        if time.monotonic() > deadline:
            raise UnavailableError(f"Ray did not release the actor names {sorted(names)} within {timeout:.0f}s")
        time.sleep(0.2)


def _ensure_coordinator(options: ServiceOptions, env: Mapping[str, str], timeout: float) -> CoordinatorInfo:
    actor = _coordinator_actor()
    if actor is not None:
        try:
            info = _get(actor.info.remote(), timeout, "the layervault coordinator actor")
        except LayervaultError:  # it could not start (e.g. storage was unreachable): start it again
            _remove([actor], grace=0)
            _wait_names_released({COORDINATOR_NAME}, timeout)
        else:
            differences = info.options.differences(options)
            if differences:
                raise InvalidArgumentError("layervault is already up on this Ray cluster with other settings ("
                                           + "; ".join(differences) + "); run `layervault ray down` first to change them")
            return info
    head = [node_id for node_id, n in _nodes().items() if n["Alive"] and _HEAD_RESOURCE in n["Resources"]]
    prefer_head = NodeAffinitySchedulingStrategy(head[0], soft=True) if head else None
    actor = (ray.remote(CoordinatorActor)
             .options(get_if_exists=True, **_service_options(COORDINATOR_NAME, env, prefer_head))
             .remote(options))
    try:
        return _get(actor.info.remote(), timeout, "the layervault coordinator actor")
    except LayervaultError:
        _remove([actor], grace=0)  # so that the next up() starts from scratch
        raise


def up(storage: str, *, env: Mapping[str, str] | None = None, timeout: float = 120.0,
       **settings: Any) -> DeploymentStatus:
    """Start (or complete) layervault on the connected Ray cluster; returns once every agent serves.

    ``env``: environment variables for the service actors only (e.g. ``AWS_*`` for S3), on
    top of what the Ray nodes' own environment gives them; ranks never receive them.
    ``timeout``: seconds to wait for every actor to serve.

    ``settings``: the fields of :class:`ServiceOptions`, each the flag of ``layervault ray up``
    with ``-`` as ``_`` (defaults as there):

    - agents: ``staging_mib``, ``chunk_mib``, ``upload_workers``, ``cache_mib``,
      ``handoff_wait_ms``, ``store_write_gbps``, ``store_read_gbps``, ``agent_host``, ``socket_dir``;
    - coordinator: ``commit_timeout``, ``retention`` (policy text or a ``Retention``),
      ``coordinator_host``, ``coordinator_port`` (0 takes any free port; the coordinator then comes
      back on another port after a crash, and agents follow it at the next ``up()``);
    - observability: ``agent_metrics_port``, ``coordinator_metrics_port`` (None: no metrics;
      0: any free port, see ``status()``), ``log_format`` (``"text"`` or ``"json"``);
    - security: ``tls_cert``, ``tls_key``, ``tls_ca``, ``tls_server_name``, ``insecure``,
      ``tokens``, ``socket_group`` (plaintext off loopback needs ``insecure=True``).
    """
    _require_ray()
    env = dict(env or {})
    unknown = set(settings) - _SETTINGS
    if unknown:
        raise TypeError(f"up() got unexpected keyword arguments {sorted(unknown)}")
    options = ServiceOptions(storage, env_names=tuple(sorted(env)), **settings)
    coordinator = _ensure_coordinator(options, env, timeout)

    nodes = _nodes()
    alive = {node_id for node_id, n in nodes.items() if n["Alive"]}
    agents = _agent_actors()
    gone = {node_id for node_id in agents if node_id not in alive}
    for node_id in gone:
        ray.kill(agents[node_id], no_restart=True)
    for node_id in sorted(alive - agents.keys()):
        strategy = NodeAffinitySchedulingStrategy(node_id, soft=False)
        agents[node_id] = (ray.remote(AgentActor)
                           .options(get_if_exists=True, **_service_options(agent_actor_name(node_id), env, strategy))
                           .remote(node_id, options))
    serving = {node_id: agents[node_id] for node_id in alive}

    problems, failed = [], []
    replies = {node_id: actor.info.remote() for node_id, actor in serving.items()}
    deadline = time.monotonic() + timeout
    stale = {}
    for node_id, reply in replies.items():
        try:
            info = _get(reply, max(1.0, deadline - time.monotonic()), f"the layervault agent actor of node {node_id}")
        except LayervaultError as exc:
            if isinstance(exc, _NodeGone) or not _nodes().get(node_id, {}).get("Alive"):
                # The node left while we deployed (Ray still listed it as alive): not a failure.
                ray.kill(serving[node_id], no_restart=True)
                gone.add(node_id)
                continue
            problems.append(str(exc))
            failed.append(node_id)
            _remove([serving[node_id]], grace=0)  # the next up() creates it afresh
            continue
        if info.coordinator != coordinator.address:
            ray.kill(serving[node_id], no_restart=False)  # Ray restarts it; it reads the new address
            stale[node_id] = info.pid
    for node_id, old_pid in stale.items():
        _wait_restarted(serving[node_id], node_id, old_pid, deadline)
    # Ray frees names asynchronously: without this wait the status below still lists removed agents.
    _wait_names_released({agent_actor_name(node_id) for node_id in gone | set(failed)}, timeout)
    if problems:
        raise UnavailableError(f"{len(problems)} of {len(serving)} layervault agents did not start: " + "; ".join(problems))
    return status(timeout=timeout)


def _wait_restarted(actor: ray.actor.ActorHandle, node_id: str, old_pid: int, deadline: float) -> AgentInfo:
    what = f"the layervault agent actor of node {node_id}"
    while True:
        info = _get(actor.info.remote(), max(1.0, deadline - time.monotonic()), what)
        if info.pid != old_pid:
            return info
        if time.monotonic() > deadline:
            raise UnavailableError(f"{what} was not restarted by Ray in time")
        time.sleep(0.2)  # ray.kill is asynchronous: the old process may still answer


def status(timeout: float = 10.0) -> DeploymentStatus:
    """What is running: the coordinator, each agent (with why it does not serve), nodes without an agent."""
    _require_ray()
    nodes = _nodes()
    coordinator, coordinator_problem = None, ""
    actor = _coordinator_actor()
    if actor is not None:
        try:
            coordinator = _get(actor.info.remote(), timeout, "the layervault coordinator actor")
        except LayervaultError as exc:
            coordinator_problem = str(exc)
    agents = _agent_actors()
    replies = {node_id: a.info.remote() for node_id, a in agents.items() if nodes.get(node_id, {}).get("Alive")}
    rows = []
    for node_id in sorted(agents):
        if node_id not in replies:
            rows.append(AgentStatus(node_id, False, None, "its node is gone; `layervault ray up` removes this agent"))
            continue
        try:
            info = _get(replies[node_id], timeout, f"the layervault agent actor of node {node_id}")
        except LayervaultError as exc:
            rows.append(AgentStatus(node_id, True, None, str(exc)))
            continue
        problem = ""
        if coordinator is not None and info.coordinator != coordinator.address:
            problem = f"reports to {info.coordinator}, not to the coordinator at {coordinator.address}; run `layervault ray up`"
        rows.append(AgentStatus(node_id, True, info, problem))
    missing = tuple(sorted(n for n, v in nodes.items() if v["Alive"] and n not in agents)) if actor is not None else ()
    return DeploymentStatus(coordinator, coordinator_problem, tuple(rows), missing)


def down(grace: float = 10.0, timeout: float = 60.0) -> int:
    """Stop every layervault actor (agents first, draining up to ``grace`` s); returns how many were running."""
    _require_ray()
    agents = _agent_actors()
    _remove(list(agents.values()), grace)
    names = {agent_actor_name(node_id) for node_id in agents}
    coordinator = _coordinator_actor()
    if coordinator is not None:
        _remove([coordinator], grace)
        names.add(COORDINATOR_NAME)
    _wait_names_released(names, timeout)
    return len(names)
