"""The API described once (protocol.routes.OPERATIONS): the app serves exactly the described
operations, with the described roles, and its OpenAPI document; Schemathesis fuzzes every
operation against the in-process app with valid tokens: no 5xx, every answer as described."""

from __future__ import annotations

import pytest
import schemathesis
from schemathesis.checks import positive_data_acceptance
from schemathesis.core.parameters import ParameterLocation
from hypothesis import HealthCheck, settings

from collector.app import create_app, issue_token
from collector.auth import create_participant
from collector.openapi import spec
from protocol import routes

from .conftest import bearer
from .test_app import assert_error

IMPLICIT_METHODS = {"HEAD", "OPTIONS"}


def _served(app) -> set[tuple[str, str]]:
    """The API's routes (the participant's page under routes.WEB_APP is not part of the API)."""
    return {(method, rule.rule) for rule in app.url_map.iter_rules() for method in rule.methods - IMPLICIT_METHODS
            if rule.rule.startswith(routes.API + "/")}


def test_every_served_route_is_described_and_every_described_one_served(app):
    described = {(op.method, op.path) for op in routes.OPERATIONS}
    assert _served(app) == described
    document = spec()
    in_spec = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert in_spec == {(m, p.replace("<", "{").replace(">", "}")) for m, p in described}


def test_a_method_not_allowed_is_json_and_names_the_allowed_ones(kit):
    resp = kit.client.put(routes.HEALTH)
    assert_error(resp, 405)
    assert set(resp.headers["Allow"].replace(" ", "").split(",")) == {"GET", "HEAD", "OPTIONS"}


def test_an_undescribed_query_parameter_is_400(kit):
    resp = kit.client.get(routes.EXPORT, query_string={"limt": 5}, headers=kit.staff("auditor"))
    assert_error(resp, 400, "invalid_input")
    assert "'limt'" in resp.json["message"] and "limit" in resp.json["message"]


@pytest.mark.parametrize("query", ["offset=&limit=5", "model_id="])
def test_an_empty_query_parameter_is_400_not_its_default(kit, query):
    resp = kit.client.get(routes.EXPORT + "?" + query, headers=kit.staff("auditor"))
    assert_error(resp, 400, "invalid_input")
    assert "is empty" in resp.json["message"]


def test_an_undescribed_view_cannot_be_registered():
    from collector.app import operation

    with pytest.raises(KeyError, match="not described"):
        operation("GET", routes.API + "/secret-backdoor")


def test_the_document_is_served_publicly_and_rate_limited_per_address(tmp_path, tiny_model_dir):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir), "READ_LIMIT_PER_MIN": 6})
    try:
        client = app.test_client()
        first = client.get(routes.OPENAPI)
        assert first.status_code == 200 and first.is_json
        assert first.json == spec()
        assert first.json["paths"]["/api/v1/items"]["post"]["x-pric-max-body-bytes"] == routes.MAX_BODY_BYTES
        limited = client.get(routes.OPENAPI)
        assert_error(limited, 429, "rate_limited")
        assert int(limited.headers["Retry-After"]) >= 1
    finally:
        app.extensions["pric"].db.dispose()


def test_each_operation_admits_exactly_its_described_roles(app):
    """A token of a role the operation does not list is 403, of one it lists is let past the
    role check (whatever the request's other faults), no token is 401."""
    client = app.test_client()
    staff = {role: bearer(issue_token(app, role)) for role in (routes.ROLE_OPERATOR, routes.ROLE_AUDITOR)}
    db = app.extensions["pric"].db
    card_id = client.get(routes.HEALTH).json["models"][0]
    for op in routes.OPERATIONS:
        if not op.roles:
            continue
        path = op.path.replace("<model_id>", card_id)
        for role in (routes.ROLE_PARTICIPANT, routes.ROLE_OPERATOR, routes.ROLE_AUDITOR):
            headers = bearer(create_participant(db)[1]) if role == routes.ROLE_PARTICIPANT else staff[role]
            status = client.open(path, method=op.method, headers=headers).status_code
            if role in op.roles:
                assert status not in (401, 403), (op.method, op.path, role, status)
            else:
                assert status == 403, (op.method, op.path, role, status)
        assert client.open(path, method=op.method).status_code == 401, (op.method, op.path)


# --- Schemathesis -------------------------------------------------------------------------------

@pytest.fixture
def fuzzed_app(tmp_path, tiny_model_dir):
    app = create_app({"DATA_DIR": str(tmp_path / "data"), "MODELS_DIR": str(tiny_model_dir),
                      "RATE_LIMIT_PER_MIN": 0, "READ_LIMIT_PER_MIN": 0, "REGISTER_LIMIT_PER_MIN": 0})
    app.config["FUZZ_TOKENS"] = {routes.ROLE_PARTICIPANT: create_participant(app.extensions["pric"].db)[1],
                                 routes.ROLE_OPERATOR: issue_token(app, routes.ROLE_OPERATOR),
                                 routes.ROLE_AUDITOR: issue_token(app, routes.ROLE_AUDITOR)}
    yield app
    app.extensions["pric"].db.dispose()


# The document the app serves (test_the_document_is_served... checks they are equal); each
# case is sent to the fixture's app in-process (schemathesis's WSGI transport). A lazy
# schema from the fixture (schemathesis.pytest.from_fixture) fails on pytest 9 (it sets the
# node's private _nodeid, gone there).
schema = schemathesis.openapi.from_dict(spec(), config=schemathesis.config.SchemathesisConfig.from_dict({
    "checks": {
        # a body that is absent or too large is rightly 411 or 413, besides the usual 4xx
        "negative_data_rejection": {"expected-statuses": [400, 401, 403, 404, 405, 406, 409, 411, 413, 415,
                                                          422, 428, 429]},
        # 422: well-formed but not what the stored data allows (e.g. too few items to train on)
        "positive_data_acceptance": {"expected-statuses": ["2XX", 401, 403, 404, 409, 422, 429]},
    },
}))
_CURRENT: dict[str, object] = {}


@schemathesis.serializer("application/x-pric-batch")
def _binary_batch(_ctx, value):  # noqa: ANN001, ANN202 - schemathesis's serializer signature
    """The binary upload format travels as the bytes generated for it (format: binary)."""
    return value if isinstance(value, bytes) else str(value).encode()


def _current_app(environ, start_response):  # noqa: ANN001, ANN202 - WSGI
    """The test's own app (each test builds one in its temporary folder): the checks that
    send requests of their own (ignored_auth, ...) reach it through the schema."""
    return _CURRENT["app"](environ, start_response)


schema.app = _current_app


@pytest.mark.slow
@schema.parametrize()
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
def test_fuzzed_requests_get_no_5xx_and_described_answers(case, fuzzed_app):
    _CURRENT["app"] = fuzzed_app
    roles = case.operation.definition.raw.get("x-pric-roles") or []
    headers = {}
    meta = case._meta  # schemathesis's record of which parts it generated invalid on purpose
    headers_invalid = meta is not None and meta.is_negative_at(ParameterLocation.HEADER)
    # a valid token of a role the operation admits, so that the checks behind authentication
    # are reached; not where the case leaves its headers (the token) out on purpose
    if roles and not headers_invalid:
        headers = bearer(fuzzed_app.config["FUZZ_TOKENS"][roles[0]])
        if case.method == "DELETE":  # withdrawal may revoke the token: a participant of its own
            headers = bearer(create_participant(fuzzed_app.extensions["pric"].db)[1])
    excluded = []
    if case.path == routes.ITEMS:
        # an upload's arrays are .npy files of the model card's shapes: no JSON Schema says
        # that, so a schema-valid body is mostly rightly refused (400, 422)
        excluded.append(positive_data_acceptance)
    case.call_and_validate(headers=headers, excluded_checks=excluded)
