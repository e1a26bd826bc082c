"""DeepSpeed ZeRO-2 and ZeRO-3 on the CPU: 2 ranks over gloo (torchrun), through `kiban fit` and the
same hpc/presets files a GPU run hands to Lightning's DeepSpeedStrategy.
"""

import json
import sys
from pathlib import Path

import pytest

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"
TORCHRUN = str(Path(sys.executable).with_name("torchrun"))
KIBAN = str(Path(sys.executable).with_name("kiban"))


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def zero2(zero2_run):
    return zero2_run


def test_zero2_trains_on_two_gloo_ranks_and_shards_the_optimizer_state(zero2):
    assert [m["step"] for m in _metrics(zero2)] == [1, 2, 3, 4]
    checkpoint = zero2 / "checkpoints" / "ckpt-000004"
    assert json.loads((checkpoint / "meta.json").read_text())["strategy"] == "raw DeepSpeed deepspeed_stage_2"
    state = {p.name for p in (checkpoint / "state").iterdir()}
    # ZeRO-2: one copy of the weights, the optimizer state split across the two ranks
    assert state == {
        "mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt",
    }
    assert (checkpoint / "manifest.json").is_file() and (checkpoint / "data.json").is_file()


def test_zero3_shards_the_weights_too_matches_zero2_and_resumes(zero2, tmp_path, fit_two_ranks):
    _fit = fit_two_ranks
    run_dir = tmp_path / "zero3"
    _fit(run_dir, "deepspeed_stage_3", 4)
    state = {p.name for p in (run_dir / "checkpoints" / "ckpt-000004" / "state").iterdir()}
    assert {"zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"} <= state
    # the same run, partitioned differently: the same data, the same losses
    two, three = _metrics(zero2), _metrics(run_dir)
    assert [m["ids"] for m in three] == [m["ids"] for m in two]
    assert [m["loss"] for m in three] == pytest.approx([m["loss"] for m in two], rel=1e-5)

    log = _fit(run_dir, "deepspeed_stage_3", 6)
    assert "resumed from" in log and "ckpt-000004 at step 4" in log
    assert [m["step"] for m in _metrics(run_dir)] == [1, 2, 3, 4, 5, 6]
