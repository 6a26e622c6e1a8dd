"""Error translation: every status becomes its typed error, with the server's message, whatever the body."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from client import Client, errors
from tests.client.conftest import Recorder, error_body, reply

STATUS_CLASSES = [
    (400, errors.BadRequestError),
    (401, errors.AuthenticationError),
    (403, errors.PermissionDeniedError),
    (404, errors.NotFoundError),
    (409, errors.ConflictError),
    (413, errors.PayloadTooLargeError),
    (422, errors.BadRequestError),
    (429, errors.RateLimitError),
    (500, errors.InternalServerError),
    (502, errors.InternalServerError),
    (503, errors.ServiceUnavailableError),
]


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES)
def test_openai_error_body_maps_to_typed_error(
    status: int, cls: type[errors.APIError], make_client: Callable[..., Client]
) -> None:
    body = error_body(
        "model 'nope' does not exist", type="not_found_error", param="model", code="model_missing"
    )
    server = Recorder(reply(status, json=body, headers={"x-request-id": "req-1"}))
    with make_client(server, max_retries=0) as client, pytest.raises(cls) as caught:
        client.models()
    exc = caught.value
    assert type(exc) is cls
    assert isinstance(exc, errors.DeltaserveError)
    assert (exc.status_code, exc.message) == (status, "model 'nope' does not exist")
    assert (exc.type, exc.param, exc.code, exc.request_id) == (
        "not_found_error",
        "model",
        "model_missing",
        "req-1",
    )
    assert str(exc).startswith(f"HTTP {status}: model 'nope' does not exist")


@pytest.mark.parametrize(("status", "cls"), STATUS_CLASSES)
def test_non_json_body_still_maps_by_status(
    status: int, cls: type[errors.APIError], make_client: Callable[..., Client]
) -> None:
    html = "<html>\n<body>\n  <h1>Bad Gateway</h1>\n</body>\n</html>"
    server = Recorder(reply(status, text=html, headers={"content-type": "text/html"}))
    with make_client(server, max_retries=0) as client, pytest.raises(cls) as caught:
        client.list_deltas()
    assert caught.value.message == "<html> <body> <h1>Bad Gateway</h1> </body> </html>"  # one line
    assert caught.value.type is None


def test_empty_body_falls_back_to_reason_phrase(make_client: Callable[..., Client]) -> None:
    with (
        make_client(Recorder(reply(404)), max_retries=0) as client,
        pytest.raises(errors.NotFoundError) as caught,
    ):
        client.get_delta("x")
    assert caught.value.message == "Not Found"


def test_unlisted_status_is_a_plain_api_error(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(418, json=error_body("teapot")))
    with make_client(server) as client, pytest.raises(errors.APIError) as caught:
        client.models()
    assert type(caught.value) is errors.APIError
    assert caught.value.status_code == 418


def test_fastapi_detail_bodies_are_understood(make_client: Callable[..., Client]) -> None:
    detail = {"detail": [{"loc": ["body", "max_tokens"], "msg": "must be positive", "type": "value_error"}]}
    with (
        make_client(Recorder(reply(422, json=detail))) as client,
        pytest.raises(errors.BadRequestError) as caught,
    ):
        client.completions("m", "p", max_tokens=-1)
    assert caught.value.message == "body.max_tokens: must be positive"


def test_retry_after_is_exposed_on_the_error(make_client: Callable[..., Client]) -> None:
    server = Recorder(reply(429, json=error_body("queue full"), headers={"Retry-After": "7"}))
    with make_client(server, max_retries=0) as client, pytest.raises(errors.RateLimitError) as caught:
        client.completions("m", "p")
    assert caught.value.retry_after == 7.0


def test_unexpected_success_body_is_a_validation_error(make_client: Callable[..., Client]) -> None:
    client = make_client(Recorder(reply(200, text="not json")))
    with client, pytest.raises(errors.APIResponseValidationError, match="GET /v1/models"):
        client.models()


def test_status_table_is_the_single_source() -> None:
    assert errors.error_class_for(404) is errors.NotFoundError
    assert errors.error_class_for(599) is errors.InternalServerError
    assert errors.error_class_for(451) is errors.APIError
