"""The coordinator's gRPC service: the commit protocol plus the catalog for clients."""

from __future__ import annotations

import grpc

from layervault.agent import keys
from layervault.agent.catalog import Catalog
from layervault.agent.commit import CommitCoordinator
from layervault.agent.manifest import checkpoint_info
from layervault.agent.rpc import handler
from layervault.agent.storage import ObjectStore
from layervault.proto import common_pb2, coordinator_pb2, coordinator_pb2_grpc


class CoordinatorService(coordinator_pb2_grpc.CoordinatorServicer):
    def __init__(self, store: ObjectStore, commit_timeout: float = 600.0) -> None:
        self.store = store
        self.catalog = Catalog(store)
        self.commits = CommitCoordinator(store, self.catalog, commit_timeout)

    @handler
    def BeginSave(self, request: coordinator_pb2.BeginSaveRequest, context: grpc.ServicerContext) -> coordinator_pb2.BeginSaveReply:
        return coordinator_pb2.BeginSaveReply(save_id=self.commits.begin(request))

    @handler
    def ReportShards(self, request: coordinator_pb2.ReportShardsRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.commits.report(request)
        return common_pb2.Empty()

    @handler
    def AbortSave(self, request: coordinator_pb2.AbortSaveRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.commits.abort(request)
        return common_pb2.Empty()

    @handler
    def Seal(self, request: coordinator_pb2.SealSaveRequest, context: grpc.ServicerContext) -> common_pb2.Empty:
        self.commits.seal(request)
        return common_pb2.Empty()

    @handler
    def WaitCommit(self, request: coordinator_pb2.WaitCommitRequest, context: grpc.ServicerContext) -> common_pb2.CheckpointInfo:
        return self.commits.wait(request)

    @handler
    def Resolve(self, request: common_pb2.ResolveRequest, context: grpc.ServicerContext) -> common_pb2.CheckpointInfo:
        key, manifest = self.catalog.resolve(request.job, request.kind, dict(request.selector.keys))
        return checkpoint_info(manifest, key)

    @handler
    def List(self, request: common_pb2.ListRequest, context: grpc.ServicerContext) -> common_pb2.ListReply:
        if request.kind:
            keys.check_kind(request.kind)
        found = self.catalog.checkpoints(request.job, request.kind)
        return common_pb2.ListReply(checkpoints=[checkpoint_info(m, k) for k, m in found])
