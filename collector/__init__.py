"""The PRIC collector: a Flask app that stores participants' anonymized features and
trains the collector's classifiers on them.

Layers, bottom to top: `db` (SQLAlchemy Core schema and connections) → `registry`
(verified model cards) → `store` (uploads, withdrawal, stats, export) and `train_job`
(downstream classifiers, torch imported lazily) → `app` (HTTP, auth, limits, logs) →
`cli` (`pric-collector`).
"""
