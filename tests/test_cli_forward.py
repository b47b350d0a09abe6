"""The ``forward`` sub-command: the closed-form forward process on embedded digits, written as a PNG grid."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ddpm_components.cli import main


def test_forward_writes_grid_from_clean_to_noise(tmp_path):
    out = tmp_path / "strip.png"
    assert (
        main(["forward", "--out", str(out), "--num-images", "3", "--num-columns", "5", "--resolution", "8"])
        == 0
    )
    grid = np.asarray(Image.open(out).convert("L"), dtype=np.float64)
    assert grid.shape == (3 * 8, 5 * 8)
    first_column, last_column = grid[:, :8], grid[:, -8:]
    # x_0 digits have mostly black background with bright strokes; x_T is (clipped) Gaussian noise around grey
    assert (first_column < 10).mean() > 0.3
    assert abs(last_column.mean() - 127.5) < 30
    assert not list(tmp_path.glob("*.tmp"))


def test_forward_is_seeded(tmp_path):
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    for out in (a, b):
        assert (
            main(["forward", "--out", str(out), "--num-images", "2", "--resolution", "8", "--seed", "3"]) == 0
        )
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))


def test_forward_rejects_bad_schedule(tmp_path, capsys):
    assert main(["forward", "--out", str(tmp_path / "x.png"), "--beta-schedule", "cubic"]) == 2
    assert "cubic" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-3", "two"])
def test_forward_rejects_non_positive_counts(value):
    with pytest.raises(SystemExit):
        main(["forward", "--num-images", value])
