"""`make demo` on scene photos built from the bundled thumbnails: the whole path runs, the
client finds the faces (and skips the photo without one), the participants are shown the
attested leakage before uploading, and the collector trains."""

from __future__ import annotations

import re

import pytest

from scripts.demo import DEMO_MODEL, NO_FACE, main


@pytest.mark.slow
def test_demo_runs_end_to_end_on_scenes_of_the_bundled_thumbnails(sample_faces, capfd):
    assert DEMO_MODEL == "pric-male-decision-aligned"  # a card with alignment: detection at work
    assert main(["--data", str(sample_faces), "--per-participant", "16"]) == 0
    captured = capfd.readouterr()
    out, err = captured.out, captured.err
    # each of the three participants sees the consent summary of the shipped model's attestation
    assert out.count("Audited by PRIC project release key") == 3
    assert out.count("scene photos with one face each, 1 without a face") == 3
    # the photo without a face is skipped with one line naming it; every scene's face is found
    # (a scene may yield a second detection, which is sent as another item)
    assert len(re.findall(rf"skipped \S*{NO_FACE}: no face found", err)) == 3
    stored = [int(n) for n in re.findall(r"(\d+) stored, 0 already there, 1 skipped \(errors\), 0 faces below "
                                         r"--min-face 20 px", out)]
    assert len(stored) == 3 and all(n == 16 for n in stored), out[-3000:]  # one face per scene (--faces largest)
    assert "Smiling classifier trained by the collector on uploaded Smiling decisions: held-out accuracy" in out
