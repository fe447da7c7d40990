"""The coordinator's gRPC service: the commit protocol plus the catalog for clients."""

from __future__ import annotations

import grpc

from layervault.agent import keys
from layervault.agent.agent_registry import AgentRegistry
from layervault.agent.auth import AccessControl
from layervault.agent.catalog import Catalog
from layervault.agent.commit import CommitCoordinator
from layervault.agent.manifest import checkpoint_info
from layervault.agent.metrics import CoordinatorMetrics
from layervault.agent.retention import Retention
from layervault.agent.rpc import handler
from layervault.agent.storage import ObjectStore
from layervault.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    #: Who may act for which job; open unless start_coordinator installs a token table.
    access: AccessControl = AccessControl(None, "coordinator")
    def __init__(self, store: ObjectStore, commit_timeout: float = 600.0, metrics: CoordinatorMetrics | None = None,
                 retention: Retention | None = None) -> None:
        self.store = store
        self.catalog = Catalog(store)
        self.metrics = metrics or CoordinatorMetrics()
        self.agents = AgentRegistry()
        self.commits = CommitCoordinator(store, self.catalog, commit_timeout, self.metrics, retention=retention,
                                         describe_agent=self.agents.describe)
        self.metrics.watch(saves_pending=self.commits.pending_count, agents_by_phase=self.agents.count_by_phase,
                           store_stats=store.stats)

    @handler
    def BeginSave(self, request: coordinator_pb2.BeginSaveRequest, context: grpc.ServicerContext) -> coordinator_pb2.BeginSaveReply:
        self.access.require(context, request.id.job, "save")
        return self.commits.begin(request, context.peer())

    @handler
    def ReportShards(self, request: coordinator_pb2.ReportShardsRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.access.require(context, request.id.job, "save")
        self.commits.report(request)
        return common_pb2.Empty()

    @handler
    def AbortSave(self, request: coordinator_pb2.AbortSaveRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.access.require(context, request.id.job, "save")
        self.commits.abort(request)
        return common_pb2.Empty()

    @handler
    def Seal(self, request: coordinator_pb2.SealSaveRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.access.require(context, request.id.job, "save")
        self.commits.seal(request)
        return common_pb2.Empty()

    @handler
    def WaitCommit(self, request: coordinator_pb2.WaitCommitRequest, context: grpc.ServicerContext) -> common_pb2.CheckpointInfo:
        self.access.require(context, request.id.job, "wait for a save of")
        return self.commits.wait(request)

    @handler
    def Resolve(self, request: common_pb2.ResolveRequest, context: grpc.ServicerContext) -> common_pb2.CheckpointInfo:
        self.access.require(context, request.job, "read")
        key, manifest = self.catalog.resolve(request.job, request.kind, dict(request.selector.keys))
        return checkpoint_info(manifest, key)

    @handler
    def List(self, request: common_pb2.ListRequest, context: grpc.ServicerContext) -> common_pb2.ListReply:
        if request.kind:
            keys.check_kind(request.kind)
        if request.job:
            self.access.require(context, request.job, "list")
        visible = self.access.visible(context)  # a List of all jobs shows only the token's jobs
        return self.catalog.checkpoints(request.job, request.kind).reply(visible)

    @handler
    def AgentHeartbeat(self, request: coordinator_pb2.AgentHeartbeatRequest, context: grpc.ServicerContext) -> coordinator_pb2.AgentHeartbeatReply:
        self.agents.record(request.state)
        if request.state.phase == coordinator_pb2.AGENT_PHASE_STOPPED:  # its goodbye: see CommitCoordinator.agent_stopped
            self.commits.agent_stopped(request.state.agent_id, context.peer())
        return coordinator_pb2.AgentHeartbeatReply()

    @handler
    def ListAgents(self, request: coordinator_pb2.ListAgentsRequest, context: grpc.ServicerContext) -> coordinator_pb2.ListAgentsReply:
        self.access.require_all_jobs(context, "list the agents")  # their states name every job's failures
        return coordinator_pb2.ListAgentsReply(agents=self.agents.list())
