"""The agent's memory stays within its staging budget plus a fixed overhead.

One agent process with a 64 MiB staging budget; four gloo ranks save 160 MiB each at once
(640 MiB, 10x the budget) and then read their layers back. The test samples the agent's RSS
every 20 ms from outside (psutil) and asserts that the peak stays within the idle agent's
RSS - which already holds the whole pre-faulted pool, i.e. the budget - plus a fixed
overhead. Back-pressure is what keeps it there: a hand-off waits while the pool is full,
nothing queues outside it, and nothing is dropped (every save commits and reads back
bit-identically).

The overheads, and why they are fixed (independent of how much the ranks save or how many
read at once); a chunk in flight costs up to 3 chunk-sized buffers (the byte-shuffled copy,
the lz4 output, the HTTP body):

* saving: ``upload_workers`` chunks in flight (8 x 4 MiB x 3 = 96 MiB);
* restoring: the agent's restore slots, 2 x ``upload_workers`` chunks for all readers
  together (16 x 4 MiB x 3 = 192 MiB; agent/restore.py ``FetchSlots``);
* both: the restore cache (``--cache-mib``, 32 MiB) and 64 MiB for thread stacks, gRPC and
  boto3 buffers and what glibc keeps of freed chunk buffers (measured: about 40 MiB).
"""

from __future__ import annotations

import time

import pytest

from layervault.client import AgentClient
from layervault.demo import free_port

from observe import RssSampler, listed_steps, stored_digests
from save_ranks import RankGroup, RankSpec
from services import ServiceProcess

pytestmark = [pytest.mark.slow, pytest.mark.s3]

MIB = 1 << 20
STAGING_MIB, CHUNK_MIB, UPLOAD_WORKERS, CACHE_MIB = 64, 4, 8, 32
RANKS, TENSORS, TENSOR_MIB = 4, 16, 40                  # 4 ranks x 160 MiB = 10x the budget
SHARED_OVERHEAD = CACHE_MIB * MIB + 64 * MIB
SAVE_OVERHEAD = UPLOAD_WORKERS * CHUNK_MIB * 3 * MIB + SHARED_OVERHEAD
RESTORE_OVERHEAD = 2 * UPLOAD_WORKERS * CHUNK_MIB * 3 * MIB + SHARED_OVERHEAD


def test_agent_rss_stays_within_budget_while_four_ranks_save_ten_times_it(s3_bucket, tmp_path, record_property):
    storage = f"s3://{s3_bucket}/memory"
    coordinator = ServiceProcess(["coordinator", "--storage", storage, "--host", "127.0.0.1", "--port", "0"],
                                 tmp_path, "coordinator")
    agent = ServiceProcess(["agent", "--coordinator", coordinator.info["coordinator"], "--storage", storage,
                            "--socket", str(tmp_path / "agent.sock"), "--staging-mib", str(STAGING_MIB),
                            "--chunk-mib", str(CHUNK_MIB), "--upload-workers", str(UPLOAD_WORKERS),
                            "--cache-mib", str(CACHE_MIB)], tmp_path, "agent")
    ranks = None
    try:
        idle = RssSampler(agent.proc.pid)
        for _ in range(10):  # settled idle agent: pool mapped and faulted in, servers up
            idle.sample()
            time.sleep(0.02)
        idle_rss = idle.peak
        spec = RankSpec("bulk", "memory", RANKS, agent.info["agent"], str(tmp_path), free_port(),
                        tensors=TENSORS, tensor_mib=TENSOR_MIB, wait_timeout=240)
        started = time.monotonic()
        with RssSampler(agent.proc.pid) as saving:
            ranks = RankGroup(spec)
            ranks.wait_for("committed", 240, kind="model", step=1)
        save_s = time.monotonic() - started
        with RssSampler(agent.proc.pid) as loading:
            codes = ranks.wait(240)
        assert codes == [0] * RANKS, ranks.logs()
        stats_peak = AgentClient(agent.info["agent"]).stats().peak_rss_bytes

        saved: dict[str, str] = {}
        for rank in range(RANKS):
            mine = ranks.find(rank, "saving")["digests"]["model"]
            assert ranks.find(rank, "loaded")["digests"]["model"] == mine, f"rank {rank} read back other bytes"
            saved.update(mine)
        assert listed_steps(storage, "memory") == {"model": [1]}
        manifest, digests = stored_digests(storage, "memory", "model", 1)
        assert manifest.world_size == RANKS and len(digests) == TENSORS
        assert digests == saved

        numbers = {"idle_rss_mib": idle_rss / MIB, "peak_rss_saving_mib": saving.peak / MIB,
                   "peak_rss_loading_mib": loading.peak / MIB, "stats_peak_rss_mib": stats_peak / MIB,
                   "save_bound_mib": (idle_rss + SAVE_OVERHEAD) / MIB,
                   "restore_bound_mib": (idle_rss + RESTORE_OVERHEAD) / MIB, "saved_mib": TENSORS * TENSOR_MIB,
                   "save_s": save_s, "samples": saving.samples + loading.samples}
        for name, value in numbers.items():
            record_property(name, round(value, 1))
        print("\nmemory bound: " + ", ".join(f"{k}={v:.1f}" for k, v in numbers.items()))
        for what, peak, overhead in (("saving", saving.peak, SAVE_OVERHEAD), ("restoring", loading.peak, RESTORE_OVERHEAD)):
            assert peak <= idle_rss + overhead, (
                f"agent RSS peaked at {peak / MIB:.0f} MiB while {what}: more than the idle "
                f"{idle_rss / MIB:.0f} MiB (pool included) + {overhead / MIB:.0f} MiB fixed overhead")
    finally:
        if ranks is not None:
            ranks.close()
        agent.stop()
        coordinator.stop()
