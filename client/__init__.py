"""The participant's on-device client (`pric-client`).

Photos never leave the device: the client decodes, crops and resizes them as the model
card says (protocol.preprocess), runs the released ONNX model with onnxruntime, and
uploads only the resulting feature, or an ambiguated sparse code whose key stays in a
local key store.

Layers (each module imports only those above it):

    home       per-user folder: config (server, token), journal, key store, model cache
    walk       which files to read (recursive, no symlinks out of the given paths)
    labels     the optional labels CSV
    journal    SQLite record of acknowledged uploads (resumable, exactly-once)
    keystore   SQLite store of ambiguation keys (and the public codes they belong to)
    api        HTTP client of the collector (retries with backoff, timeouts)
    models     model fetch, cache and sha256 check; onnxruntime runner
    pipeline   photo → item id + model input → released arrays
    cli        the `pric-client` commands

This package never imports torch (tests/client proves it in a subprocess).
"""
