"""`--shard auto` and the per-process GPU, from the variables SLURM and torchrun set (no launcher needed)."""
from __future__ import annotations

import logging

import pytest

from featstore.devices import device_name
from featstore.errors import BadArgumentError, FeatstoreError
from featstore.extraction.launcher import detect_share, local_rank


def resolve_shard(spec, env):
    s = detect_share(spec, env)
    return s.k, s.n


def resolve_device(device, env, shard):
    return device_name(device, local_rank=local_rank(shard, env), env=env)
# what the launchers set, trimmed to the variables that matter here
SBATCH_ARRAY = {"SLURM_JOB_ID": "7", "SLURM_ARRAY_TASK_ID": "3", "SLURM_ARRAY_TASK_COUNT": "4",
                "SLURM_ARRAY_TASK_MIN": "0", "SLURM_ARRAY_TASK_MAX": "3", "SLURM_ARRAY_TASK_STEP": "1",
                "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_LOCALID": "0"}
SRUN = {"SLURM_JOB_ID": "7", "SLURM_PROCID": "5", "SLURM_NTASKS": "8", "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_STEP_ID": "0", "SLURM_LOCALID": "1"}
TORCHRUN = {"RANK": "6", "WORLD_SIZE": "8", "LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}


@pytest.mark.parametrize(("spec", "expected"), [(None, (0, 1)), ("0/1", (0, 1)), ("2/4", (2, 4)), (" 3 / 4 ", (3, 4)),
                                                ((1, 2), (1, 2)), ("AUTO", (0, 1))])
def test_explicit_shards(spec, expected):
    assert resolve_shard(spec, env={}) == expected


@pytest.mark.parametrize("spec", ["4/4", "1/0", "-1/4", "1", "a/b", "1/2/3", "", (2, 2), (0, 1, 2), ("0", "1")])
def test_bad_shards_are_one_line_errors_naming_the_flag(spec):
    with pytest.raises(BadArgumentError) as e:
        resolve_shard(spec, env={})
    assert isinstance(e.value, FeatstoreError) and isinstance(e.value, ValueError)
    assert str(e.value).startswith("--shard") and "\n" not in str(e.value)


@pytest.mark.parametrize(("env", "expected"), [
    (SBATCH_ARRAY, (3, 4)),
    ({**SBATCH_ARRAY, "SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "2", "SLURM_ARRAY_TASK_MAX": "9",
      "SLURM_ARRAY_TASK_COUNT": "8"}, (3, 8)),  # --array=2-9: ids need not start at 0
    ({**SBATCH_ARRAY, "SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "7",
      "SLURM_ARRAY_TASK_STEP": "2", "SLURM_ARRAY_TASK_COUNT": "4"}, (3, 4)),  # --array=1-7:2
    ({"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_MAX": "4"}, (3, 4)),  # no COUNT
    (SRUN, (5, 8)),
    ({**SRUN, "SLURM_NTASKS": "16"}, (5, 8)),  # srun -n 8 inside a 16-task allocation: the step's count wins
    (TORCHRUN, (6, 8)),
    ({**SBATCH_ARRAY, **TORCHRUN}, (3 * 8 + 6, 32)),  # torchrun inside each array task
    ({**SBATCH_ARRAY, **SRUN}, (3 * 8 + 5, 32)),  # srun tasks inside each array task
    ({**SRUN, "SLURM_PROCID": "0", "SLURM_NTASKS": "1", "SLURM_STEP_NUM_TASKS": "1", **TORCHRUN}, (6, 8)),
    ({"RANK": "0", "WORLD_SIZE": "1"}, (0, 1)),
])
def test_auto_reads_the_launcher(env, expected):
    assert resolve_shard("auto", env=env) == expected


def test_auto_without_a_launcher_takes_everything_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="featstore.extraction.launcher"):
        assert resolve_shard("auto", env={"HOME": "/root"}) == (0, 1)
    assert "no SLURM or torchrun" in caplog.text


def test_ntasks_without_srun_warns(caplog):
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}  # an sbatch script that forgot srun
    with caplog.at_level(logging.WARNING, logger="featstore.extraction.launcher"):
        assert resolve_shard("auto", env=env) == (0, 4)
    assert "srun" in caplog.text


@pytest.mark.parametrize("env", [
    {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_COUNT": "4"},  # min 0: id 4 is out of range
    {"SLURM_ARRAY_TASK_ID": "4", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_STEP": "2",
     "SLURM_ARRAY_TASK_COUNT": "4"},  # --array=1,4,...: not a regular range
    {"SLURM_ARRAY_TASK_ID": "1"},  # no count and no max
    {"SLURM_ARRAY_TASK_ID": "x", "SLURM_ARRAY_TASK_COUNT": "4"},
    {"RANK": "8", "WORLD_SIZE": "8"},
    {"RANK": "0", "WORLD_SIZE": ""},
])
def test_auto_rejects_inconsistent_variables(env):
    with pytest.raises(BadArgumentError, match=r"^--shard") as e:
        resolve_shard("auto", env=env)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(("device", "env", "shard", "expected"), [
    ("cuda", TORCHRUN, "auto", "cuda:2"),
    ("cuda", SRUN, "auto", "cuda:1"),
    ("cuda", {**SRUN, **TORCHRUN}, "auto", "cuda:2"),  # torchrun under srun: torchrun's local rank
    ("cuda", {**SRUN, "CUDA_VISIBLE_DEVICES": "3"}, "auto", "cuda:0"),  # srun --gpus-per-task=1
    ("cuda", {**SRUN, "CUDA_VISIBLE_DEVICES": "0,1"}, "auto", "cuda:1"),
    ("cuda", SBATCH_ARRAY, "auto", "cuda:0"),
    ("cuda", {}, "auto", "cuda"),
    ("cuda", TORCHRUN, "1/8", "cuda"),  # explicit shards: the user picks the device
    ("cuda", TORCHRUN, None, "cuda"),
    ("cuda:3", TORCHRUN, "auto", "cuda:3"),
    ("cpu", TORCHRUN, "auto", "cpu"),
])
def test_resolve_device(device, env, shard, expected):
    assert resolve_device(device, env=env, shard=shard) == expected


def test_describe_shard_names_the_source():
    line = detect_share("auto", env={**SBATCH_ARRAY, **TORCHRUN}).line()
    assert line.startswith("share 30/32") and "SLURM array task 3" in line and "torchrun rank 6 of 8" in line
    assert detect_share("1/4", env={}).line() == "share 1/4 (--shard 1/4)"
    assert detect_share(None, env=TORCHRUN).n == 1  # variables count only with --shard auto
