"""ModelManager / OptimizerManager against a real coordinator and agent (gRPC), on file and S3."""

from __future__ import annotations

import copy
import threading

import grpc
import pytest
import torch

import layervault as lv
from layervault.agent.checksum import crc32c
from layervault.agent.codecs import StoreRates
from layervault.client import AgentClient, CheckpointRef
from layervault.proto import agent_pb2, agent_pb2_grpc, common_pb2
from layervault.torch import ModelManager, OptimizerManager

from polling import eventually
from services import start_in_process


class Net(torch.nn.Module):
    def __init__(self, width: int = 64, depth: int = 3) -> None:
        super().__init__()
        self.encoder = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(depth)])
        self.norm = torch.nn.LayerNorm(width)
        self.head = torch.nn.Linear(width, 4)
        self.register_buffer("counter", torch.arange(10, dtype=torch.int64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(torch.relu(self.encoder(x))))


def train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        x = torch.randn(16, 64, generator=gen)
        y = torch.randn(16, 4, generator=gen)
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.fixture
def services(store_url):
    running = start_in_process(store_url)
    yield running
    running.stop()


@pytest.fixture(params=[True, False], ids=["shm", "grpc-stream"])
def shared_memory(request):
    return request.param


def managers(services, job="run-42", shared_memory=True, compressor="lz4"):
    client = AgentClient(services.agent_address, shared_memory=shared_memory)
    mm = ModelManager(lv.ModelConfig(job=job, name="net", additional={"creator": "me", "version": "1.0"},
                                     compressor=compressor), agent=client)
    om = OptimizerManager(lv.OptimizerConfig(job=job, name="adamw"), agent=client)
    return mm, om


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_save_load_continue_training_identically(services, shared_memory):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.85, 0.99), weight_decay=0.1)
    train(model, opt, 3, seed=1)
    mm, om = managers(services, shared_memory=shared_memory)
    mm.save(model, step=3, epoch=1).wait(timeout=60)
    om.save(opt, model=model).wait(timeout=60)  # step 3 from the optimizer's own state
    expected = train(*copy.deepcopy((model, opt)), 4, seed=2)  # one deepcopy keeps opt tied to the copy

    fresh = Net()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.5)
    mm.load(fresh, step=3)
    om.load(fresh_opt, step=3, model=fresh)
    assert_same_state(model.state_dict(), fresh.state_dict())
    assert fresh_opt.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    for (_, a), (_, b) in zip(sorted(opt.state_dict()["state"].items()), sorted(fresh_opt.state_dict()["state"].items())):
        assert_same_state(a, b)
    assert train(fresh, fresh_opt, 4, seed=2) == expected


def test_find_by_step_epoch_key_and_latest(services):
    model = Net()
    mm, _ = managers(services)
    states = {}
    for step in (10, 20, 30):
        with torch.no_grad():
            model.head.weight.fill_(step)
        mm.save(model, step=step, epoch=step // 10, loss=1.0 / step, phase="warmup" if step < 30 else "main").wait(60)
        states[step] = copy.deepcopy(model.state_dict())
    target = Net()
    assert mm.load(target).step == 30
    assert_same_state(target.state_dict(), states[30])
    mm.load(target, epoch=1)
    assert_same_state(target.state_dict(), states[10])
    mm.load(target, phase="warmup")  # newest match
    assert_same_state(target.state_dict(), states[20])
    mm.load(target, loss=1.0 / 30)
    assert_same_state(target.state_dict(), states[30])
    listed = mm.checkpoints()
    assert [c.step for c in listed] == [10, 20, 30]
    assert listed[0].keys == {"step": 10, "epoch": 1, "loss": 0.1, "phase": "warmup"}
    assert listed[0].name == "net" and listed[0].raw_bytes > 0


def test_load_layer_fetches_only_that_layer(services):
    model = Net(width=256, depth=4)  # 256 KiB per linear weight, 1 MiB chunks
    mm, _ = managers(services)
    mm.save(model, step=1).wait(60)
    manifest = mm.client.resolve("run-42", "model", {"step": "1"})
    shard = next(s for s in manifest.shards if s.name == "encoder.2.weight")
    before = services.agent.service.store.stats.snapshot()
    tensor = mm.load_layer("encoder.2.weight", step=1)
    after = services.agent.service.store.stats.snapshot()
    assert torch.equal(tensor, model.encoder[2].weight.detach())
    assert after["gets"] - before["gets"] == len(shard.chunks)
    assert after["get_bytes"] - before["get_bytes"] == shard.stored_bytes
    total = sum(s.stored_bytes for s in manifest.shards)
    assert shard.stored_bytes < total / 4


@pytest.mark.parametrize("rates, weight_codec", [(StoreRates(), []), (StoreRates(0.01, 0.1), ["shuffle/1:4", "lz4/1:1"])],
                         ids=["default-rates", "slow-store"])
def test_each_layers_codec_pays_for_itself_at_the_agents_store_rates(store_url, rates, weight_codec):
    """Dense fp32 saves ~10% with shuffle+lz4: worth its CPU only on a slow store; counters shrink
    ~8x, worth it on both; what the manifest records is what a load decodes."""
    running = start_in_process(store_url, store_rates=rates)
    try:
        state = {"weight": torch.randn(256, 256, generator=torch.Generator().manual_seed(3)),
                 "steps": torch.arange(1 << 15, dtype=torch.int64)}
        mm, _ = managers(running, job="codecs")
        mm.save(state, step=1).wait(60)
        shards = {s.name: s for s in mm.client.resolve("codecs", "model", {"step": "1"}).shards}
        assert list(shards["weight"].codec) == weight_codec
        assert list(shards["steps"].codec) == ["shuffle/1:8", "lz4/1:1"]
        assert shards["steps"].stored_bytes < shards["steps"].raw_bytes / 4
        assert (shards["weight"].stored_bytes < shards["weight"].raw_bytes) == bool(weight_codec)
        target = {name: torch.zeros_like(t) for name, t in state.items()}
        mm.load(target, step=1)
        assert_same_state(target, state)
    finally:
        running.stop()


def test_second_save_of_a_step_is_already_exists_unless_overwrite(services):
    model = Net()
    mm, _ = managers(services)
    mm.save(model, step=5).wait(60)
    with pytest.raises(lv.AlreadyExistsError, match="step 5 is already committed"):
        mm.save(model, step=5)
    with torch.no_grad():
        model.head.bias.fill_(7.0)
    mm.save(model, step=5, overwrite=True).wait(60)
    target = Net()
    mm.load(target, step=5)
    assert torch.equal(target.head.bias, torch.full((4,), 7.0))
    # the overwritten attempt's objects are gone, only the new ones remain
    manifest = mm.client.resolve("run-42", "model", {"step": "5"})
    referenced = {c.key for s in manifest.shards for c in s.chunks}
    stored = {k for k in services.store.list("run-42/model/0000000005/")}
    assert stored == referenced


def test_not_found_names_what_is_missing(services):
    mm, _ = managers(services, job="nothing-here")
    with pytest.raises(lv.NotFoundError, match="nothing-here"):
        mm.load(Net())
    model = Net()
    mm.save(model, step=1, epoch=0).wait(60)
    with pytest.raises(lv.NotFoundError, match="step=2"):
        mm.load(Net(), step=2)
    with pytest.raises(lv.NotFoundError, match="epoch=9"):
        mm.load(Net(), epoch=9)
    with pytest.raises(lv.NotFoundError, match="no.such.layer"):
        mm.load_layer("no.such.layer", step=1)


def test_not_found_is_the_grpc_status(services):
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent.tcp_address))
    with pytest.raises(grpc.RpcError) as info:
        stub.Resolve(common_pb2.ResolveRequest(job="ghost", kind="model"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ghost" in info.value.details()
    with pytest.raises(grpc.RpcError) as info:
        stub.Resolve(common_pb2.ResolveRequest(job="../etc", kind="model"))
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_mismatched_model_is_refused_and_left_untouched(services):
    mm, _ = managers(services)
    mm.save(Net(width=64), step=1).wait(60)
    other = Net(width=32)
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(lv.IncompatibleStateError, match=r"encoder.0.weight: shape \[64, 64\] in the checkpoint, \[32, 32\]"):
        mm.load(other, step=1)
    assert_same_state(other.state_dict(), before)
    half = Net().to(torch.float16)
    with pytest.raises(lv.IncompatibleStateError, match="dtype float32 in the checkpoint, float16"):
        mm.load(half, step=1)


def test_corrupted_chunk_is_data_loss_and_model_untouched(services):
    model = Net()
    mm, _ = managers(services, compressor="none")
    mm.save(model, step=1).wait(60)
    manifest = mm.client.resolve("run-42", "model", {"step": "1"})
    shard = next(s for s in manifest.shards if s.name == "encoder.1.weight")
    key = shard.chunks[0].key
    body = bytearray(services.store.get(key))
    body[100] ^= 0xFF
    services.store.put(key, bytes(body))
    target = Net()
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(lv.ChecksumError, match=r"checksum mismatch.*step 1, layer 'encoder.1.weight', object " + key):
        mm.load(target, step=1)
    assert_same_state(target.state_dict(), before)


def test_bytes_changed_after_the_ranks_checksum_never_commit(services, shared_memory, monkeypatch):
    """The rank's CRC32C of each staged chunk travels with the hand-off and the agent checks it
    before the upload: one flipped bit in the pool after staging (a stray write) or in a gRPC
    message (the way there) fails the save with DATA_LOSS naming job, step, layer and rank."""
    import layervault.client as client_module

    model = Net()
    mm, _ = managers(services, shared_memory=shared_memory)
    mm.save(model, step=1).wait(60)
    want = copy.deepcopy(model.state_dict())
    victim = model.state_dict()["encoder.2.weight"]

    if shared_memory:
        original = client_module._copy_and_checksum

        def flip_after_checksum(source, offset, dst, chunk_size):
            crcs = original(source, offset, dst, chunk_size)
            if source.tensor.data_ptr() == victim.data_ptr() and offset == 0:
                dst[5] ^= 0x10
            return crcs

        monkeypatch.setattr(client_module, "_copy_and_checksum", flip_after_checksum)
    else:
        frame = client_module.DataFrame

        def flip_on_the_way(entry, offset, data, crcs):
            data = bytearray(data)
            if data == victim.numpy().tobytes():
                data[5] ^= 0x10
            return frame(entry, offset, bytes(data), crcs)

        monkeypatch.setattr(client_module, "DataFrame", flip_on_the_way)
    with torch.no_grad():
        victim.add_(1.0)
    with pytest.raises(lv.ChecksumError, match=r"run-42/model/step 2 rank 0: .*layer 'encoder.2.weight' changed after "
                                               r"rank 0 staged them \(crc32c 0x[0-9a-f]{8}, the rank computed") as raised:
        mm.save(model, step=2).wait(60)
    assert raised.value.code == grpc.StatusCode.DATA_LOSS
    assert [c.step for c in mm.checkpoints()] == [1]
    monkeypatch.undo()
    target = Net()
    mm.load(target)
    assert_same_state(target.state_dict(), want)
    mm.save(model, step=2).wait(60)  # the same step saves once the bytes arrive intact
    assert [c.step for c in mm.checkpoints()] == [1, 2]


def test_staging_smaller_than_the_state_back_pressures(store_url):
    running = start_in_process(store_url, staging_bytes=2 << 20, chunk_size=512 << 10)
    try:
        model = Net(width=512, depth=4)  # ~4 MiB of weights through a 2 MiB pool
        mm, _ = managers(running)
        mm.save(model, step=1).wait(60)
        target = Net(width=512, depth=4)
        mm.load(target)
        assert_same_state(target.state_dict(), model.state_dict())
        # the last releases are processed after load() returns
        eventually(lambda: running.agent.service.pool.in_use == 0, "the agent's pool drained")
    finally:
        running.stop()


def test_arbitrary_layer_names_round_trip_under_the_prefix(services):
    names = ["../../escape", "/abs", "ünï/层", "..", "a" * 300, "x\ty"]
    state = {name: torch.full((3,), float(i)) for i, name in enumerate(names)}
    mm, _ = managers(services)
    mm.save(state, step=1).wait(60)
    for key in services.store.list(""):
        assert key.startswith("run-42/model/"), key
        assert "/../" not in key and not key.startswith("/")
    target = {name: torch.zeros(3) for name in names}
    mm.load(target, step=1)
    assert_same_state(target, state)


def test_rank_that_disconnects_mid_handoff_never_commits(services):
    model = Net()
    mm, _ = managers(services)
    mm.save(model, step=1).wait(60)
    # A rank opens step 2, stages part of it, then its stream dies.
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(services.agent_address))
    spec = agent_pb2.EntrySpec(name="w", nbytes=1 << 20)
    spec.layout.dtype, spec.layout.global_shape[:], spec.layout.local_shape[:] = "uint8", [1 << 20], [1 << 20]
    spec.layout.offsets[:] = [0]
    open_msg = agent_pb2.SaveOpen(id=common_pb2.CheckpointId(job="run-42", kind="model", step=2), rank=0,
                                  world_size=1, entries=[spec], shared_memory=False)

    def requests():
        yield agent_pb2.SaveRequest(open=open_msg)
        yield agent_pb2.SaveRequest(data=agent_pb2.DataPiece(entry=0, entry_offset=0, data=b"x" * 1000,
                                                                       chunk_crc32c=[crc32c(b"x" * 1000)]))

    call = stub.Save(requests())
    next(call)  # opened
    with pytest.raises(grpc.RpcError) as info:
        next(call)  # the request stream ends without finish
    assert info.value.code() == grpc.StatusCode.ABORTED
    with pytest.raises(lv.SaveFailedError):
        mm.client.wait_save(CheckpointRef("run-42", "model", 2), rank=0, timeout=30)
    assert [c.step for c in mm.checkpoints()] == [1]
    target = Net()
    mm.load(target)
    assert_same_state(target.state_dict(), model.state_dict())


def test_client_unmaps_the_pool_of_a_restarted_agent(store_url):
    """A restarted agent has a new pool; the rank must not keep the dead one's memory mapped."""
    first = start_in_process(store_url)
    client = AgentClient(first.agent_address)
    ModelManager(lv.ModelConfig(job="restart", name="net"), agent=client).save(Net(), step=1).wait(60)
    old_pool = str(first.agent.service.pool.path)
    assert old_pool in client._pools
    first.stop()
    second = start_in_process(store_url)
    try:
        new_pool = second.agent.service.pool
        client._pool(str(new_pool.path), new_pool.size)  # what the next Opened reply leads to
        assert list(client._pools) == [str(new_pool.path)]
    finally:
        second.stop()


def test_save_falls_back_to_the_grpc_stream_when_the_pool_cannot_be_mapped(services, monkeypatch):
    client = AgentClient(services.agent_address, shared_memory=True)
    monkeypatch.setattr(client, "_pool", lambda path, size: (_ for _ in ()).throw(FileNotFoundError(path)))
    mm = ModelManager(lv.ModelConfig(job="remote", name="net"), agent=client)
    model = Net()
    mm.save(model, step=1).wait(60)  # the agent said "use my pool", the rank could not map it
    assert torch.equal(ModelManager(lv.ModelConfig(job="remote", name="net"), agent=AgentClient(
        services.agent_address, shared_memory=False)).load_layer("head.weight", step=1), model.head.weight.detach())
    with pytest.raises(lv.LayervaultError, match="LAYERVAULT_SHARED_MEMORY=0"):
        mm.load_layer("head.weight", step=1)


def test_background_save_overlaps_forward_and_backward_and_commits_the_snapshot(services, shared_memory):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 2, seed=1)
    mm, om = managers(services, shared_memory=shared_memory)
    expected_model = copy.deepcopy(model.state_dict())
    expected_opt = copy.deepcopy(opt.state_dict())
    handles = [mm.save(model, step=2, background=True), om.save(opt, model=model, background=True)]
    # The next step's forward and backward run while the state is staged; only step() must wait.
    loss = torch.nn.functional.mse_loss(model(torch.randn(16, 64)), torch.randn(16, 4))
    opt.zero_grad()
    loss.backward()
    assert all(h.wait_staged(timeout=60) > 0 for h in handles)
    assert all(h.staged for h in handles)
    opt.step()  # changes every weight and moment after staging: the checkpoint keeps the snapshot
    assert [h.wait(timeout=60).id.step for h in handles] == [2, 2]

    fresh = Net()
    fresh_opt = torch.optim.Adam(fresh.parameters(), lr=1e-2)
    mm.load(fresh, step=2)
    om.load(fresh_opt, step=2, model=fresh)
    assert_same_state(fresh.state_dict(), expected_model)
    for index, state in expected_opt["state"].items():
        assert_same_state(fresh_opt.state_dict()["state"][index], state)


class StalledStaging:
    """Holds every background hand-off at its first piece until ``go()``: the test decides
    what the training thread does while the state is being staged."""

    def __init__(self, monkeypatch) -> None:
        from layervault.torch import tensors

        self.started, self._go = threading.Event(), threading.Event()
        for method in ("copy_to", "read"):  # shared memory, gRPC stream
            monkeypatch.setattr(tensors.TensorSource, method, self._stalling(getattr(tensors.TensorSource, method)))

    def _stalling(self, original):
        def first_piece_waits(source, *args):
            self.started.set()
            assert self._go.wait(30)
            return original(source, *args)
        return first_piece_waits

    def go(self) -> None:
        self._go.set()


def test_background_save_whose_tensors_change_while_staging_never_commits(services, shared_memory, monkeypatch):
    model = Net()
    mm, _ = managers(services, shared_memory=shared_memory)
    mm.save(model, step=1).wait(60)
    committed = copy.deepcopy(model.state_dict())
    stalled = StalledStaging(monkeypatch)
    handle = mm.save(model, step=2, background=True)
    assert stalled.started.wait(30) and not handle.staged
    with torch.no_grad():
        model.head.weight.add_(1.0)  # the optimizer step that came too early
    stalled.go()
    with pytest.raises(lv.StagedWhileChangingError, match=r"run-42/model step 2 was not saved: 1 tensor\(s\) changed "
                                                         r"while being staged \(head.weight\)") as info:
        handle.wait_staged(timeout=60)
    assert info.value.code == grpc.StatusCode.ABORTED
    with pytest.raises(lv.StagedWhileChangingError):
        handle.wait(timeout=60)
    with pytest.raises(lv.SaveFailedError):  # the agent aborted the attempt: nothing of step 2 commits
        mm.client.wait_save(CheckpointRef("run-42", "model", 2), rank=0, timeout=30)
    assert [c.step for c in mm.checkpoints()] == [1]
    target = Net()
    mm.load(target)
    assert_same_state(target.state_dict(), committed)
    monkeypatch.undo()
    mm.save(model, step=2).wait(60)  # the step can be saved again
    assert [c.step for c in mm.checkpoints()] == [1, 2]


def test_background_save_snapshots_buffers_that_the_overlapped_forward_changes(services, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    mm, _ = managers(services)
    model(torch.randn(4, 8))
    expected = copy.deepcopy(model.state_dict())
    stalled = StalledStaging(monkeypatch)
    handle = mm.save(model, step=1, background=True)
    assert stalled.started.wait(30)
    model(torch.randn(4, 8) * 3)  # the next forward pass updates the running statistics in place
    stalled.go()
    assert handle.wait(timeout=60).id.step == 1
    assert not torch.equal(model.state_dict()["1.running_mean"], expected["1.running_mean"])
    target = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8))
    mm.load(target)
    assert_same_state(target.state_dict(), expected)


def held_by_agent(running, manifest, names) -> bool:
    """Whether the agent sets aside pool memory for every piece of a held restore of ``names``."""
    stub = agent_pb2_grpc.AgentStub(grpc.insecure_channel(running.agent_address))
    open_msg = agent_pb2.RestoreOpen(id=common_pb2.CheckpointId(job=manifest.job, kind=manifest.kind, step=manifest.step),
                                     names=names, shared_memory=True, hold=True)
    call = stub.Restore(iter([agent_pb2.RestoreRequest(open=open_msg)]))
    held = next(call).opened.held
    call.cancel()  # the agent frees what it set aside when the stream ends
    return held


@pytest.mark.parametrize("mode", ["shm-held", "shm-copied", "grpc-stream"])
def test_load_writes_into_the_model_only_after_every_chunk_arrived_verified(store_url, mode):
    # shm-copied: the pool (1 MiB) cannot set aside the 1 MiB state, so pieces are copied out as they come.
    running = start_in_process(store_url, staging_bytes=(1 << 20) if mode == "shm-copied" else (64 << 20),
                               chunk_size=256 << 10)
    try:
        model = Net(width=256, depth=4)  # 4 x 256 KiB weights: several chunks arrive before the late, bad one
        mm, _ = managers(running, shared_memory=mode != "grpc-stream", compressor="none")
        mm.save(model, step=1).wait(60)
        manifest = mm.client.resolve("run-42", "model", {"step": "1"})
        key = next(s for s in manifest.shards if s.name == "encoder.3.weight").chunks[-1].key
        body = bytearray(running.store.get(key))
        body[7] ^= 0x01
        running.store.put(key, bytes(body))
        target = Net(width=256, depth=4)
        before = copy.deepcopy(target.state_dict())
        with pytest.raises(lv.ChecksumError, match="encoder.3.weight"):
            mm.load(target, step=1)
        assert_same_state(target.state_dict(), before)

        mm.save(model, step=2).wait(60)
        if mode != "grpc-stream":
            step2 = mm.client.resolve("run-42", "model", {"step": "2"})
            assert held_by_agent(running, step2, list(model.state_dict())) == (mode == "shm-held")
        weight = target.encoder[0].weight
        mm.load(target, step=2)
        assert_same_state(target.state_dict(), model.state_dict())
        assert target.encoder[0].weight is weight  # loaded in place
        # the agent frees the set-aside extents as the stream ends
        eventually(lambda: running.agent.service.pool.in_use == 0, "the agent's pool drained")
    finally:
        running.stop()


def test_optimizer_rolls_back_in_place_and_a_corrupt_checkpoint_leaves_it_untouched(services):
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train(model, opt, 2, seed=1)
    mm, om = managers(services, compressor="none")
    mm.save(model, step=2).wait(60)
    om.save(opt, model=model).wait(60)
    saved = copy.deepcopy(opt.state_dict())
    expected = train(*copy.deepcopy((model, opt)), 3, seed=2)
    train(model, opt, 2, seed=3)  # the run goes on, then rolls back to step 2 (e.g. after a loss spike)
    moments = opt.state[model.head.weight]["exp_avg"]
    mm.load(model, step=2)
    om.load(opt, step=2, model=model)
    for index, state in saved["state"].items():
        assert_same_state(opt.state_dict()["state"][index], state)
    assert opt.state[model.head.weight]["exp_avg"].data_ptr() == moments.data_ptr()  # restored in place
    assert train(model, opt, 3, seed=2) == expected

    om.save(opt, model=model, step=5).wait(60)
    manifest = om.client.resolve("run-42", "optimizer", {"step": "5"})
    key = next(s for s in manifest.shards if s.name.startswith("head.weight/exp_avg_sq")).chunks[-1].key
    body = bytearray(services.store.get(key))
    body[3] ^= 0x10
    services.store.put(key, bytes(body))
    train(model, opt, 1, seed=4)  # the state moves on from what step 5 holds
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(lv.ChecksumError, match="head.weight/exp_avg_sq"):
        om.load(opt, step=5, model=model)
    for index, state in before["state"].items():
        assert_same_state(opt.state_dict()["state"][index], state)


def test_background_save_raises_its_hand_off_errors_from_wait_staged_and_wait(services):
    model = Net()
    mm, _ = managers(services)
    mm.save(model, step=1).wait(60)
    handle = mm.save(model, step=1, background=True)  # returns before the agent answers
    with pytest.raises(lv.AlreadyExistsError, match="run-42/model step 1 is already committed") as info:
        handle.wait_staged(timeout=60)
    assert info.value.code == grpc.StatusCode.ALREADY_EXISTS
    assert handle.staged
    with pytest.raises(lv.AlreadyExistsError):
        handle.wait(timeout=60)
