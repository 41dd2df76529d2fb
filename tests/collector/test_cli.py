"""`pric-collector` commands called in-process: token, stats, train, model list/retire."""

from __future__ import annotations

import json

import numpy as np
import pytest

from collector.app import create_app
from collector.cli import main
from protocol import routes
from protocol.wire import UploadItem


@pytest.fixture
def filled(kit):
    """The kit's app holding 60 items whose Smiling label is linearly separable, of 3 participants."""
    heads = [kit.register()[1] for _ in range(3)]
    rng = np.random.default_rng(1)
    direction = rng.choice([-0.3, 0.3], size=(16, 8, 8)).astype(np.float32)  # class means 19 σ apart
    items = []
    for i in range(60):
        y = i % 2
        f = rng.standard_normal((16, 8, 8)).astype(np.float32) + (direction if y else -direction)
        items.append(UploadItem(f"c{i}", {"feature": f}, {"Smiling": y}))
    for n, h in enumerate(heads):
        assert kit.upload(h, kit.body(items[n::3])).json["stored"] == 20
    return kit


def test_token_create_prints_a_working_token(tmp_path, tiny_model_dir, capsys, db_args):
    data = tmp_path / "data"
    assert main(["token", "create", "--role", "operator", "--data-dir", str(data), *db_args(data)]) == 0
    token = capsys.readouterr().out.strip()
    app = create_app({"DATA_DIR": str(data), "MODELS_DIR": str(tiny_model_dir)})
    resp = app.test_client().get(routes.STATS, headers={"Authorization": "Bearer " + token})
    assert resp.status_code == 200


def test_token_create_refuses_participant_role(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["token", "create", "--role", "participant", "--data-dir", str(tmp_path)])
    assert exc.value.code == 2


def test_stats_json_matches_the_api(filled, capsys, db_args):
    data_dir, db = filled.app.config["DATA_DIR"], db_args(filled.app.config["DATA_DIR"])
    assert main(["stats", "--data-dir", data_dir, "--json", *db]) == 0
    printed = json.loads(capsys.readouterr().out)
    api = filled.client.get(routes.STATS, headers=filled.staff("operator")).json
    assert printed == api
    assert printed["items"] == 60 and printed["labels"]["Smiling"] == {"0": 30, "1": 30}
    assert main(["stats", "--data-dir", data_dir, *db]) == 0
    assert "items:        60" in capsys.readouterr().out


def test_train_json_beats_majority_and_is_recorded(filled, capsys, db_args):
    data_dir = filled.app.config["DATA_DIR"]
    assert main(["train", "--task", "Smiling", "--data-dir", data_dir, "--json", *db_args(data_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model_id"] == filled.card.model_id
    assert result["n_train"] + result["n_test"] == 60
    assert result["accuracy"] > result["majority_rate"]
    stats = filled.client.get(routes.STATS, headers=filled.staff("operator")).json
    assert [c["id"] for c in stats["classifiers"]] == [result["classifier"]["id"]]


def test_train_api_mlp_beats_majority(filled, capsys, db_args):
    op = filled.staff("operator")
    resp = filled.client.post(routes.TRAIN, json={"task": "Smiling", "kind": "mlp"}, headers=op)
    assert resp.status_code == 202 and resp.json["status"] == "queued"
    data_dir = filled.app.config["DATA_DIR"]
    assert main(["worker", "--once", "--data-dir", data_dir, *db_args(data_dir)]) == 0
    job = filled.client.get(resp.json["status_url"], headers=op).json
    assert job["status"] == "done" and job["attempts"] == 1
    assert job["result"]["classifier"]["kind"] == "mlp"
    assert job["result"]["accuracy"] > job["result"]["majority_rate"]
    capsys.readouterr()
    assert main(["jobs", "show", str(job["id"]), "--json", "--data-dir", data_dir, *db_args(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out) == job
    assert main(["jobs", "list", "--data-dir", data_dir, *db_args(data_dir)]) == 0
    assert capsys.readouterr().out.startswith(f"#{job['id']}")


def test_train_errors_are_one_line_with_exit_codes(tmp_path, tiny_model_dir, capsys, db_args):
    data = str(tmp_path / "data")
    create_app({"DATA_DIR": data, "MODELS_DIR": str(tiny_model_dir)})  # registers the model
    assert main(["train", "--task", "Smiling", "--data-dir", data, *db_args(data)]) == 3
    err = capsys.readouterr().err.strip()
    assert err.startswith("pric-collector: error: too few items") and "\n" not in err
    assert main(["train", "--task", "Smiling", "--data-dir", data, "--model-id", "nope@1", *db_args(data)]) == 7


def test_stats_on_a_folder_without_database_is_an_error(tmp_path, capsys):
    assert main(["stats", "--data-dir", str(tmp_path / "typo")]) == 7
    assert "no collector database" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()


def test_model_list_and_retire(filled, tiny_model_dir, capsys, db_args):
    data_dir = filled.app.config["DATA_DIR"]
    dirs = ["--data-dir", data_dir, "--models-dir", str(tiny_model_dir), *db_args(data_dir)]
    model_id = filled.card.model_id
    assert main(["model", "list", *dirs, "--json"]) == 0
    assert [(m["model_id"], m["status"]) for m in json.loads(capsys.readouterr().out)] == [(model_id, "active")]
    assert main(["model", "retire", model_id, *dirs]) == 0
    _, h = filled.register()
    resp = filled.upload(h, filled.body(filled.items(2, prefix="late")))  # the running app sees it
    assert resp.status_code == 409 and "retired" in resp.json["message"]
    assert main(["model", "retire", "nope@1", *dirs]) == 7


def test_serve_on_a_port_in_use_fails_with_one_line(tmp_path, tiny_model_dir, capsys):
    import socket

    from collector.cli import main as cli_main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        rc = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir),
                       "--port", str(port), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert f"--port {port}: cannot listen there (address already in use)" in err


@pytest.mark.parametrize(("args", "message"), [
    (["--port", "99999"], "--port 99999: must be between 0 (any free port) and 65535"),
    (["--port", "-1"], "--port -1: must be between 0"),
    (["--threads", "0"], "--threads 0: must be between 1 and 256"),
    (["--rate-limit", "-5"], "--rate-limit -5.0: must be a number of uploads per minute"),
    (["--rate-limit", "nan"], "--rate-limit nan: must be a number of uploads per minute"),
])
def test_serve_refuses_bad_numbers_in_one_line_before_touching_the_data_folder(tmp_path, tiny_model_dir, capsys,
                                                                               args, message):
    from collector.cli import main as cli_main

    rc = cli_main(["serve", "--data-dir", str(tmp_path / "d"), "--models-dir", str(tiny_model_dir), *args, "--quiet"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "d").exists()
