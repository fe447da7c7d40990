"""Uploads defer to hand-offs (agent/handoff_gate.py): when they wait, and that they never wait for good."""

from __future__ import annotations

import threading
import time

import torch

import layervault as lv
from layervault.agent.handoff_gate import HandoffGate
from layervault.torch import ModelManager

from services import start_in_process


def _gate(waiters: list[int] | None = None, max_wait: float = 5.0, linger: float = 0.0) -> HandoffGate:
    waiting = waiters if waiters is not None else [0]
    return HandoffGate(lambda: waiting[0], max_wait=max_wait, linger=linger)


def _in_thread(fn):  # noqa: ANN001, ANN202
    result: list[float] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    return thread, result


def test_no_handoff_no_wait():
    gate = _gate()
    assert gate.yield_to_handoffs() == 0.0


def test_an_upload_waits_until_the_handoff_ends():
    gate = _gate()
    with gate.handoff():
        assert gate.active == 1
        thread, waited = _in_thread(gate.yield_to_handoffs)
        time.sleep(0.3)
        assert thread.is_alive()  # still deferring to the open hand-off
    thread.join(5)
    assert not thread.is_alive() and 0.3 <= waited[0] < 5.0
    assert gate.active == 0


def test_the_wait_is_bounded_when_a_handoff_never_ends():
    gate = _gate(max_wait=0.2)
    with gate.handoff():
        waited = gate.yield_to_handoffs()
    assert 0.2 <= waited < 2.0


def test_no_wait_while_a_rank_waits_for_staging_memory():
    waiters = [0]
    gate = _gate(waiters)
    with gate.handoff():
        thread, waited = _in_thread(gate.yield_to_handoffs)
        time.sleep(0.1)
        waiters[0] = 1  # the rank now needs the memory that only uploads free
        thread.join(2)
        assert not thread.is_alive() and waited[0] < 2.0
        assert gate.yield_to_handoffs() < 0.1   # no deferring at all now


def test_uploads_linger_briefly_after_a_handoff():
    gate = _gate(linger=0.2)
    with gate.handoff():
        pass
    waited = gate.yield_to_handoffs()
    assert 0.1 <= waited < 1.0
    time.sleep(0.25)
    assert gate.yield_to_handoffs() == 0.0


def test_a_handoff_that_fails_still_opens_the_gate():
    gate = _gate()
    try:
        with gate.handoff():
            raise RuntimeError("rank went away")
    except RuntimeError:
        pass
    assert gate.active == 0 and gate.yield_to_handoffs() == 0.0


def test_saves_through_a_small_pool_complete_with_the_gate(tmp_path):
    """Ranks that must wait for staging memory are never starved by the gate: a save 8x the
    pool streams through it, over shared memory and over gRPC, from two ranks at once."""
    services = start_in_process((tmp_path / "store").as_uri(), staging_bytes=4 << 20, chunk_size=1 << 20)
    try:
        state = {f"w{i}": torch.arange(1 << 20, dtype=torch.float32) + i for i in range(8)}   # 32 MiB
        for shared_memory in (True, False):
            client = lv.AgentClient(services.agent_address, shared_memory=shared_memory)
            mm = ModelManager(lv.ModelConfig(job=f"gate-{shared_memory}", name="m"), agent=client)
            handles = []
            ranks = [threading.Thread(target=lambda s=step: handles.append(mm.save(state, step=s))) for step in (1, 2)]
            for rank in ranks:
                rank.start()
            for rank in ranks:
                rank.join(120)
            assert len(handles) == 2
            for handle in handles:
                handle.wait(120)
            for name, want in state.items():
                assert torch.equal(mm.load_layer(name, step=2), want), name
            client.close()
    finally:
        services.stop()
