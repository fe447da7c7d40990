"""One rank's save, run as a real process by the fault tests (alone, it commits on its own).

    python one_rank_save.py AGENT JOB STEP slow|fast [RANK WORLD_SIZE]

"slow" prints "staging" after copying its first piece into the agent's pool and then stalls
there, in the middle of its hand-off, until it is killed: its rank has begun the save on
its agent but never reports. RANK and WORLD_SIZE default to 0 and 1.
"""

import sys
import time

import torch

from layervault.client import AgentClient, CheckpointRef, SaveEntry
from layervault.proto import manifest_pb2
from layervault.torch.tensors import TensorSource, whole_layout


class StallingSource(TensorSource):
    def copy_to(self, offset, dst):
        super().copy_to(offset, dst)
        print("staging", flush=True)
        time.sleep(600)


def main(address: str, job: str, step: str, mode: str, rank: str = "0", world_size: str = "1") -> None:
    tensor = torch.ones(1 << 20)
    source = StallingSource(tensor) if mode == "slow" else TensorSource(tensor)
    handle = AgentClient(address).save(CheckpointRef(job, "model", int(step)), rank=int(rank), world_size=int(world_size),
                                       config=manifest_pb2.Config(name="x"), keys={}, extra={},
                                       entries=[SaveEntry("w", whole_layout(tensor), source)])
    handle.wait(timeout=60)


if __name__ == "__main__":
    main(*sys.argv[1:7])
