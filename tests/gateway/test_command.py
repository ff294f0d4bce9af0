"""``conveyor gateway`` as a command: it says where it listens, serves, and stops on SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np

from .conftest import CLASSES, WIDTH, Served

REPO = Path(__file__).resolve().parents[2]


def test_gateway_command_serves_the_plan_and_stops_on_sigterm(mlp: Served) -> None:
    env = {k: v for k, v in os.environ.items() if k != "CONVEYOR_AMQP_URL"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.Popen(
        [sys.executable, "-m", "conveyor", "gateway", str(mlp.plan.directory), "--port", "0",
         "--device", "cpu"],
        cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        m = re.search(r"at (http://[\d.]+:\d+)/v2/models/mlp on in-process workers", line)
        assert m, line
        x = np.ones((1, WIDTH), np.float32)
        bias = np.zeros((1, CLASSES), np.float32)
        body = json.dumps({"id": "cli", "inputs": [
            {"name": "x", "shape": [1, WIDTH], "datatype": "FP32", "data": x.ravel().tolist()},
            {"name": "bias", "shape": [1, CLASSES], "datatype": "FP32",
             "data": bias.ravel().tolist()}]}).encode()
        req = urllib.request.Request(f"{m.group(1)}/v2/models/mlp/infer", body,
                                     {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as r:
            answer = json.loads(r.read())
        assert answer["id"] == "cli"
        probs = next(o for o in answer["outputs"] if o["name"] == "probs")
        want = mlp.expected({"x": x, "bias": bias})["probs"]
        np.testing.assert_allclose(np.array(probs["data"]).reshape(probs["shape"]), want,
                                   rtol=1e-5, atol=1e-6)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert "stopped" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
