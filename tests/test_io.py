"""msa_fast/_io.py, the one writer of JSON files and figures (checkpoints, analyses, the
scripts of benchmarks/, experiments/ and tools/): writes are atomic, a failed serialisation
leaves nothing behind, and ``figure`` writes its PNG and always closes the figure."""
import json
import math
import os

import numpy as np
import pytest
import torch

from msa_fast import _io


def test_save_json_writes_atomically_and_creates_parent_dirs(tmp_path):
    path = tmp_path / "a" / "b" / "r.json"
    assert _io.save_json(str(path), {"x": 1, "y": [1.5, None]}) == str(path)
    text = path.read_text()
    assert json.loads(text) == {"x": 1, "y": [1.5, None]}
    assert text == json.dumps({"x": 1, "y": [1.5, None]}, indent=2)  # the benchmarks' format
    assert os.listdir(path.parent) == ["r.json"]  # no temp file left


def test_save_json_failure_keeps_the_old_file_and_leaves_no_partial_file(tmp_path):
    path = tmp_path / "r.json"
    _io.save_json(str(path), {"old": True})
    with pytest.raises(TypeError):
        _io.save_json(str(path), {"new": object()})  # not serialisable
    with pytest.raises(ValueError):
        _io.save_json(str(path), {"new": math.nan}, allow_nan=False)
    assert json.loads(path.read_text()) == {"old": True}
    assert os.listdir(tmp_path) == ["r.json"]
    fresh = tmp_path / "fresh.json"
    with pytest.raises(TypeError):
        _io.save_json(str(fresh), [object()])
    assert not fresh.exists() and os.listdir(tmp_path) == ["r.json"]


def test_save_json_failure_while_writing_leaves_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    _io.save_json(str(path), {"old": True})

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError):
        _io.save_json(str(path), {"new": True})
    assert json.loads(path.read_text()) == {"old": True} and os.listdir(tmp_path) == ["r.json"]


def test_save_json_numpy_and_torch_scalars_and_options(tmp_path):
    path = tmp_path / "r.json"
    _io.save_json(str(path), {"b": np.float32(0.5), "a": torch.tensor(3), "v": np.arange(3), "t": torch.ones(2)},
                  indent=None, sort_keys=True, newline=True)
    text = path.read_text()
    assert text.endswith("\n") and text.index('"a"') < text.index('"b"')
    assert json.loads(text) == {"a": 3, "b": 0.5, "v": [0, 1, 2], "t": [1.0, 1.0]}


def test_figure_writes_a_png_and_closes_the_figure(tmp_path):
    pytest.importorskip("matplotlib")
    plt = _io.pyplot()
    before = set(plt.get_fignums())
    path = tmp_path / "sub" / "f.png"
    with _io.figure(str(path), 1, 2, figsize=(4, 2), dpi=50) as (fig, axes):
        assert len(axes) == 2 and fig.get_dpi() > 0
        axes[0].plot([0, 1], [1, 0])
        assert set(plt.get_fignums()) - before  # open while drawing
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert set(plt.get_fignums()) == before  # closed


def test_figure_closes_the_figure_and_writes_nothing_when_drawing_fails(tmp_path):
    pytest.importorskip("matplotlib")
    plt = _io.pyplot()
    before = set(plt.get_fignums())
    path = tmp_path / "f.png"
    with pytest.raises(RuntimeError), _io.figure(str(path)) as (_, ax):
        ax.plot([0, 1])
        raise RuntimeError("drawing failed")
    assert not path.exists() and set(plt.get_fignums()) == before


def test_save_figure_closes_a_figure_made_elsewhere(tmp_path):
    pytest.importorskip("matplotlib")
    plt = _io.pyplot()
    fig, ax = plt.subplots()
    ax.bar([0, 1], [1, 2])
    _io.save_figure(fig, str(tmp_path / "g.png"), dpi=40)
    assert (tmp_path / "g.png").stat().st_size > 0 and fig.number not in plt.get_fignums()
