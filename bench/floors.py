"""The floors no checkpoint system can beat on this box: a memcpy into pre-faulted memory,
a raw multipart PUT of the same bytes, a raw parallel ranged GET of them."""

from __future__ import annotations

import io

import torch

from s3 import Bucket
from state import tensors, timed


def floors(bucket: Bucket, runs: int, model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, list[float]]:
    src = tensors(model, opt)
    dst = [torch.empty_like(t) for t in src]
    for d, s in zip(dst, src):
        d.copy_(s)  # pre-fault
    copy = [timed(lambda: [d.copy_(s) for d, s in zip(dst, src)]) for _ in range(runs)]
    dst.clear()  # free the copy before the blob below
    blob = b"".join(t.numpy().tobytes() for t in src)
    put = [timed(lambda: bucket.put("floor/raw", io.BytesIO(blob))) for _ in range(runs)]
    get = [timed(lambda: bucket.get("floor/raw", io.BytesIO())) for _ in range(runs)]
    return {"copy": copy, "put": put, "get": get}
