"""`make demo` on the bundled thumbnails: the whole path runs and the collector trains."""

from __future__ import annotations

import pytest

from scripts.demo import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_bundled_thumbnails(sample_faces, capsys):
    assert main(["--data", str(sample_faces), "--per-participant", "16"]) == 0
    out = capsys.readouterr().out
    assert "Smiling classifier trained by the collector" in out
    assert "held-out accuracy" in out
