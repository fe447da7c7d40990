"""Load test: N ranks x M back-to-back asynchronous saves on one agent.

Four gloo ranks each hand off five 64 MiB model checkpoints without waiting in between
(one ``save()`` handle per step, all waited at the end), so hand-offs of later steps overlap
the uploads and commits of earlier ones on a 64 MiB pool. Every save must commit, every step
must be listed in storage with all four ranks' shards and read back bit-identically, none
lost. The peak agent RSS and the total time are recorded, not asserted (speed is judged
in bench/).
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
RANKS, STEPS, TENSORS, TENSOR_MIB = 4, 5, 16, 4


def test_four_ranks_five_back_to_back_saves_all_commit(s3_bucket, tmp_path, record_property):
    storage = f"s3://{s3_bucket}/load"
    coordinator = ServiceProcess(["coordinator", "--storage", storage, "--host", "127.0.0.1", "--port", "0"],
                                 tmp_path, "coordinator")
    agent = ServiceProcess(["agent", "--coordinator", coordinator.info["coordinator"], "--storage", storage,
                            "--socket", str(tmp_path / "agent.sock"), "--staging-mib", "64", "--chunk-mib", "1"],
                           tmp_path, "agent")
    ranks = None
    try:
        spec = RankSpec("stream", "load", RANKS, agent.info["agent"], str(tmp_path), free_port(),
                        tensors=TENSORS, tensor_mib=TENSOR_MIB, steps=STEPS)
        with RssSampler(agent.proc.pid) as rss:
            ranks = RankGroup(spec)
            first = min(r["t"] for r in ranks.wait_for("saving", 120, step=1))
            last = max(r["t"] for r in ranks.wait_for("committed", 120, kind="model", step=STEPS))
            codes = ranks.wait(120)
        assert codes == [0] * RANKS, ranks.logs()
        stats = AgentClient(agent.info["agent"]).stats()

        assert listed_steps(storage, "load") == {"model": list(range(1, STEPS + 1))}
        for step in range(1, STEPS + 1):
            saved = ranks.find(0, "saving", step=step)["digests"]["model"]
            for rank in range(RANKS):
                assert ranks.find(rank, "saving", step=step)["digests"]["model"] == saved, f"rank {rank} step {step}"
                assert ranks.find(rank, "loaded", step=step)["digests"]["model"] == saved, (
                    f"rank {rank} loaded step {step} differently")
            manifest, digests = stored_digests(storage, "load", "model", step)
            assert manifest.world_size == RANKS and {s.rank for s in manifest.shards} == set(range(RANKS))
            assert digests == saved, f"step {step} in storage differs from what the ranks saved"

        numbers = {"saves": RANKS * STEPS, "checkpoints": STEPS, "mib_per_step": TENSORS * TENSOR_MIB,
                   "save_to_last_commit_s": last - first, "peak_rss_mib": rss.peak / MIB,
                   "stats_peak_rss_mib": stats.peak_rss_bytes / MIB, "store_puts": stats.store_puts}
        for name, value in numbers.items():
            record_property(name, round(value, 2))
        print("\nload: " + ", ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in numbers.items()))
    finally:
        if ranks is not None:
            ranks.close()
        agent.stop()
        coordinator.stop()
