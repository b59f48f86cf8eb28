"""Starting ranks: which documents each rank reads, and the rendezvous under torchrun and srun."""

import subprocess
import sys

import pytest

from mechdistill.distill.launch import first_host, launch_command, local_launcher, rendezvous_env, shard
from tests.helpers import REPO


def test_shard_pads_by_wrapping_and_strides():
    items = list("abcde")
    shards = [shard(items, rank, 2) for rank in range(2)]
    assert shards == [["a", "c", "e"], ["b", "d", "a"]]  # padded to 6 with the first item
    assert shard(items, 1, 2, pad=str.upper) == ["b", "d", "A"]  # padding marked
    assert shard(list("abcd"), 1, 2) == ["b", "d"] and shard([], 0, 2) == []
    with pytest.raises(ValueError, match="rank 2"):
        shard(items, 2, 2)


def test_slurm_variables_map_onto_the_torch_rendezvous():
    env = rendezvous_env({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                          "SLURM_JOB_NODELIST": "gpu[07-08,12]", "SLURM_JOB_ID": "123456"})
    assert env == {"RANK": "5", "WORLD_SIZE": "16", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "MASTER_PORT": str(20000 + 123456 % 20000)}
    torchrun = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    assert rendezvous_env({**torchrun, "SLURM_PROCID": "0"}) == torchrun  # torchrun's own variables win
    assert rendezvous_env({})["WORLD_SIZE"] == "1"
    assert first_host("node1,node2") == "node1" and first_host("a[003-004]") == "a003"


def test_the_local_launcher_starts_several_ranks_with_torchrun_and_one_as_the_command_itself():
    assert local_launcher("cuda") == "python -m mechdistill.distill.launch"
    assert local_launcher("cpu") == "DS_ACCELERATOR=cpu python -m mechdistill.distill.launch"
    argv, env = launch_command(2, ["python", "-m", "x"], lambda: 1234)
    assert argv == ["torchrun", "--standalone", "--no-python", "--nproc_per_node", "2", "python", "-m", "x"]
    assert env == {}
    argv, env = launch_command(1, ["python", "-m", "x"], lambda: 1234)
    assert argv == ["python", "-m", "x"]
    assert env == {"MASTER_PORT": "1234"}
    assert rendezvous_env(env) == {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                                   "MASTER_PORT": "1234"}
    with pytest.raises(ValueError, match="usage"):
        launch_command(0, ["python"], lambda: 1)


def test_the_launcher_runs_one_rank_as_the_command_with_a_rendezvous():
    proc = subprocess.run([sys.executable, "-m", "mechdistill.distill.launch", "1", sys.executable, "-c",
                           "import os; print('RANK' in os.environ, int(os.environ['MASTER_PORT']) > 0)"],
                          capture_output=True, text=True, cwd=REPO, check=True)
    assert proc.stdout.split() == ["False", "True"]  # not torchrun's: rendezvous_env makes it rank 0 of 1

