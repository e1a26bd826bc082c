"""kiban.atomic: the one way files and folders are written."""

import json
import math
import os

import numpy as np
import pytest

from kiban.atomic import staged_file, staged_folder, stale_stages, write_atomic, write_json


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "config.yaml"
    write_atomic(path, "a: 1\n")
    write_atomic(path, b"a: 2\n", durable=True)
    assert path.read_text() == "a: 2\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["config.yaml"]
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would, not mkstemp's 0600


def test_strict_json_refuses_nan_naming_the_file_and_the_field_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json(path, {"rmse": 1.5, "n": np.int64(3)}, default=int)
    with pytest.raises(ValueError, match=r"metrics.json: .*\['results'\]\[1\]\['spearman'\] is nan"):
        write_json(path, {"results": [{"spearman": 0.5}, {"spearman": math.nan}]})
    assert json.loads(path.read_text()) == {"rmse": 1.5, "n": 3}


def test_staged_folder_appears_whole_or_not_at_all(tmp_path):
    target = tmp_path / "model"
    with pytest.raises(RuntimeError):
        with staged_folder(target) as staging:
            (staging / "config.json").write_text("{}")
            raise RuntimeError("killed mid-way")
    assert not target.exists() and not stale_stages(target)
    with staged_folder(target) as staging:
        (staging / "config.json").write_text("{}")
        assert not target.exists()
    assert (target / "config.json").is_file() and not stale_stages(target)
    with staged_folder(target) as staging:  # replace=True: a newer build replaces the old one
        (staging / "weights").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["weights"]
    with pytest.raises(OSError):
        with staged_folder(target, replace=False) as staging:
            (staging / "x").write_text("x")
    assert (target / "weights").read_text() == "new"


def test_staged_file_keeps_the_suffix_for_writers_that_add_theirs(tmp_path):
    out = tmp_path / "emb.npz"
    with staged_file(out) as staged:
        np.savez(staged, x=np.arange(3))
    assert np.load(out)["x"].tolist() == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["emb.npz"]
