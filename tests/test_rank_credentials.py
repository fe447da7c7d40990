"""Ranks never receive storage credentials (issue 6, security): a rank whose environment holds
no ``AWS_*`` variable at all saves to and loads from an S3-backed agent, and the SDK never
loads an S3 client in the rank."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from services import ServiceProcess

RANK = textwrap.dedent("""
    import json, os, sys
    import torch
    import layervault as lv
    from layervault.torch import ModelManager

    assert not any(k.startswith("AWS_") for k in os.environ), "the rank was given storage settings"
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 64)
    mm = ModelManager(lv.ModelConfig(job="no-creds", name="linear"), agent=sys.argv[1])
    mm.save(model, step=1).wait(60)
    fresh = torch.nn.Linear(64, 64)
    mm.load(fresh, step=1)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    s3_clients = sorted(m for m in sys.modules if m.split(".")[0] in ("boto3", "botocore", "s3transfer"))
    print(json.dumps({"s3_modules": s3_clients, "listed": [c.step for c in mm.checkpoints()]}))
""")


@pytest.mark.s3
def test_a_rank_without_any_storage_credentials_saves_and_loads_through_its_agent(s3_bucket, tmp_path):
    up = ServiceProcess(["up", "--storage", f"s3://{s3_bucket}/creds", "--socket", str(tmp_path / "agent.sock"),
                         "--staging-mib", "16"], tmp_path, "up")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
        ran = subprocess.run([sys.executable, "-c", RANK, up.info["agent"]], env=env, capture_output=True, text=True,
                             timeout=120)
    finally:
        up.stop()
    assert ran.returncode == 0, ran.stderr
    report = json.loads(ran.stdout.strip().splitlines()[-1])
    assert report == {"s3_modules": [], "listed": [1]}
