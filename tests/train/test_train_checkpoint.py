"""Atomic checkpoints: manifest, rename, latest pointer, refusal of corrupt ones, SIGKILL mid-save."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kiban.train.checkpoint import (
    CheckpointError,
    commit_checkpoint,
    complete_checkpoints,
    latest_checkpoint,
    prepare_checkpoint,
    prune_checkpoints,
    verify_checkpoint,
)
from kiban.train.runner import fit

SMOKE = Path(__file__).resolve().parents[2] / "configs" / "smoke.yaml"


def _save(root, step, payload=b"weights"):
    tmp = prepare_checkpoint(root, step)
    (tmp / "state.ckpt").write_bytes(payload)
    (tmp / "shards").mkdir()
    (tmp / "shards" / "rank1.pt").write_bytes(payload[::-1])
    return commit_checkpoint(tmp, step=step)


def test_a_save_is_renamed_into_place_with_a_manifest_and_moves_the_latest_pointer(tmp_path):
    first = _save(tmp_path, 5)
    second = _save(tmp_path, 10)
    assert [p.name for _, p in complete_checkpoints(tmp_path)] == ["ckpt-000005", "ckpt-000010"]
    assert (tmp_path / "latest").read_text().strip() == "ckpt-000010"
    manifest = json.loads((second / "manifest.json").read_text())
    assert set(manifest["files"]) == {"state.ckpt", "shards/rank1.pt"}
    assert verify_checkpoint(first)["step"] == 5
    assert latest_checkpoint(tmp_path) == second
    assert not list(tmp_path.glob("*.tmp"))


def test_an_unfinished_save_is_never_picked_and_is_cleaned_up_by_the_next(tmp_path):
    done = _save(tmp_path, 2)
    torn = prepare_checkpoint(tmp_path, 4)
    (torn / "state.ckpt").write_bytes(b"half")
    assert latest_checkpoint(tmp_path) == done
    with pytest.raises(
        CheckpointError, match=r"ckpt-000004.tmp has no manifest.json: it was never completed"
    ):
        verify_checkpoint(torn)
    _save(tmp_path, 6)
    assert not torn.exists()


def test_a_corrupt_checkpoint_is_refused_by_name(tmp_path):
    good = _save(tmp_path, 3)
    with (good / "shards" / "rank1.pt").open("r+b") as handle:
        handle.write(b"X")
    with pytest.raises(
        CheckpointError, match=r"ckpt-000003 is corrupt: shards/rank1.pt does not match its sha256"
    ):
        latest_checkpoint(tmp_path)
    other = _save(tmp_path, 4)
    (other / "state.ckpt").unlink()
    with pytest.raises(CheckpointError, match=r"ckpt-000004 is corrupt: state.ckpt is missing"):
        verify_checkpoint(other)


def test_a_lost_pointer_update_still_finds_the_newest_complete_checkpoint(tmp_path):
    _save(tmp_path, 1)
    newest = _save(tmp_path, 2)
    (tmp_path / "latest").write_text("ckpt-000001\n")  # as if the crash came between rename and pointer
    assert latest_checkpoint(tmp_path) == newest


def test_pruning_keeps_the_last_n_and_the_protected_best(tmp_path):
    for step in (1, 2, 3, 4, 5):
        _save(tmp_path, step)
    prune_checkpoints(tmp_path, keep_last=2, protect={"ckpt-000002"})
    assert [p.name for _, p in complete_checkpoints(tmp_path)] == [
        "ckpt-000002",
        "ckpt-000004",
        "ckpt-000005",
    ]


def test_fit_refuses_to_resume_from_a_corrupt_checkpoint(train_config):
    config = train_config(
        "trainer.max_steps=2",
        "callbacks.checkpoint.every_n_steps=2",
        "data.val=null",
        "trainer.val_check_interval=null",
    )
    result = fit(config)
    state = result.checkpoint / "state.ckpt"
    data = bytearray(state.read_bytes())
    data[len(data) // 2] ^= 0xFF
    state.write_bytes(bytes(data))
    config.trainer.max_steps = 4
    with pytest.raises(
        CheckpointError, match=r"ckpt-000002 is corrupt: state.ckpt does not match its sha256"
    ):
        fit(config)


def _steps(run_dir):
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        entry = json.loads(line)
        out.setdefault(entry["step"], []).append(entry)
    return out


def test_a_run_killed_in_the_middle_of_a_save_resumes_from_the_last_complete_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    command = [
        str(Path(sys.executable).with_name("kiban")),
        "fit",
        "--config",
        str(SMOKE),
        f"run.dir={run_dir}",
        "trainer.max_steps=6",
        "callbacks.checkpoint.every_n_steps=2",
        "callbacks.checkpoint.keep_last=5",
        "data.val=null",
        "trainer.val_check_interval=null",
        "data.num_workers=1",
        "trainer.deterministic=true",
    ]
    env = {**os.environ, "KIBAN_TEST_PAUSE_IN_SAVE": "4:120"}
    victim = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    torn = run_dir / "checkpoints" / "ckpt-000004.tmp"
    deadline = time.monotonic() + 90
    # rng-rank00000.pt is written after state.ckpt, just before the manifest: the save is mid-way
    while not (torn / "rng-rank00000.pt").exists():
        assert victim.poll() is None, victim.stderr.read()
        assert time.monotonic() < deadline, "the run never reached the save of step 4"
        time.sleep(0.1)
    time.sleep(0.5)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    victim.stderr.close()
    assert (torn / "state.ckpt").is_file() and not (torn / "manifest.json").exists()
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "ckpt-000002"

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stderr and "ckpt-000002 at step 2" in resumed.stderr
    assert not torn.exists()
    assert [p.name for _, p in complete_checkpoints(run_dir / "checkpoints")] == [
        "ckpt-000002",
        "ckpt-000004",
        "ckpt-000006",
    ]
    steps = _steps(run_dir)
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    for step in (3, 4):  # trained before the kill, and again after the resume: the same numbers
        before, after = steps[step]
        assert (after["loss"], after["grad_norm"], after["ids"]) == (
            before["loss"],
            before["grad_norm"],
            before["ids"],
        )
