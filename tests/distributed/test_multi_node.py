"""Two nodes simulated on one machine (`ray.cluster_utils.Cluster`: a head and one more node,
one CPU each, one rank per node): the tiny job with trainer.nnodes=2 runs its first 2 steps
across them (placement, rendezvous on rank 0's node, TP=2 over the two nodes); then the second
node is removed mid-run and the run stops (exit 1) naming the lost node."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from repo_paths import REPO



def _steps_logged(metrics_file: Path) -> list[int]:
    if not metrics_file.exists():
        return []
    return [json.loads(line)["step"] for line in metrics_file.read_text().splitlines() if line]


@pytest.mark.slow
def test_two_node_run_then_a_lost_node_stops_it_naming_the_node(tmp_path):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        second = cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        run_dir = tmp_path / "run"
        driver = subprocess.Popen(
            [sys.executable, "-m", "megatron_intuitor.main", f"trainer.output_dir={run_dir}",
             f"logger.log_dir={tmp_path / 'logs'}", "logger.backends=[jsonl]",
             "trainer.nnodes=2", "trainer.n_gpus_per_node=1", "trainer.placement=STRICT_SPREAD",
             f"trainer.ray_address={cluster.address}", "trainer.total_steps=50",
             "trainer.val_every=0", "trainer.save_every=0"],
            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
        deadline = time.monotonic() + 400
        while _steps_logged(run_dir / "metrics.jsonl")[-1:] < [2]:
            assert driver.poll() is None, driver.communicate()[0][-4000:]
            assert time.monotonic() < deadline, "2 steps did not finish in time"
            time.sleep(0.5)
        cluster.remove_node(second)
        output, _ = driver.communicate(timeout=300)
    finally:
        cluster.shutdown()
    assert driver.returncode == 1, output[-4000:]
    assert f"was on node {second.node_id} (" in output
    assert "lost: Ray marked the node dead)" in output
    assert "Traceback" not in output
