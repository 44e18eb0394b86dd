"""State that differs per process survives DDP (two gloo processes on the CPU)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np

from tests.helpers import ENV, ROOT, TORCHRUN, free_port

WORKER = Path(__file__).with_name("ddp_state_worker.py")


def test_per_rank_state_survives_ddp_and_is_agreed_on_exactly(tmp_path):
    """DDP copies every buffer from rank 0 at each forward: OLS's running sums must survive it, and
    their all-reduced matrix be the one-process matrix over both ranks' samples. The stop signal
    both ranks agree on is the largest asked for (a MAX all-reduce, whatever Accelerate's version)."""
    env = {key: value for key, value in ENV.items() if key != "ACCELERATE_USE_CPU"}
    result = subprocess.run(
        [TORCHRUN, "--nproc_per_node", "2", "--master_port", str(free_port()), str(WORKER), str(tmp_path)],
        capture_output=True, text=True, timeout=240, env=env, cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    for record in ranks:
        np.testing.assert_allclose(record["own_counts"], record["expected_counts"])
        np.testing.assert_allclose(record["own_sums"], record["expected_sums"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(record["soft_labels"], record["union_soft_labels"], rtol=1e-5, atol=1e-6)
    assert ranks[0]["expected_counts"] != ranks[1]["expected_counts"]  # the ranks' statistics really differ
    # The stop signal every process agrees on is one that was asked for (SIGTERM), not the sum 15 + 2.
    assert [record["agreed_signal"] for record in ranks] == [15, 15]
