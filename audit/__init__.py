"""The auditor: fresh attackers, baselines, reconstruction, re-identification, reports (pric-audit)."""
