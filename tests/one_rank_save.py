"""A one-rank save that commits on its own, run as a real process by the fault tests.

    python one_rank_save.py AGENT JOB STEP slow|fast

"slow" prints "staging" after copying its first piece into the agent's pool and then stalls
there, in the middle of its hand-off, until it is killed.
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


def main(address: str, job: str, step: str, mode: str) -> None:
    tensor = torch.ones(1 << 20)
    source = StallingSource(tensor) if mode == "slow" else TensorSource(tensor)
    handle = AgentClient(address).save(CheckpointRef(job, "model", int(step)), rank=0, world_size=1,
                                       config=manifest_pb2.Config(name="x"), keys={}, extra={},
                                       entries=[SaveEntry("w", whole_layout(tensor), source)])
    handle.wait(timeout=60)


if __name__ == "__main__":
    main(*sys.argv[1:5])
