"""`make demo` on the bundled thumbnails: the whole path runs, the participants are shown
the attested leakage before uploading, and the collector trains."""

from __future__ import annotations

import pytest

from scripts.demo import main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_bundled_thumbnails(sample_faces, capfd):
    assert main(["--data", str(sample_faces), "--per-participant", "16"]) == 0
    out = capfd.readouterr().out
    # each of the three participants sees the consent summary of the shipped model's attestation
    assert out.count("Audited by PRIC project release key") == 3
    assert out.count("16 stored, 0 already there, 0 skipped (errors)") == 3
    assert "Smiling classifier trained by the collector on uploaded Smiling decisions: held-out accuracy" in out
