"""OpenAI's wire format: every field of a request is checked, and a stream never shows part of a stop."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mesh.web.openai import ApiError, StopText, chunk_body, completion_body, error_body, parse_request


def parse(body, chat: bool = True):
    return parse_request(json.dumps(body).encode(), chat)


def test_a_good_request_becomes_a_typed_one():
    req = parse({"model": "m", "messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                                              {"type": "text", "text": "b"}]},
                                            {"role": "user", "content": "hi"}],
                 "temperature": 0, "max_tokens": 7, "stop": "x", "seed": 3, "stream": True,
                 "stream_options": {"include_usage": True}, "n": 1, "presence_penalty": 0})
    assert req.messages == ({"role": "system", "content": "ab"}, {"role": "user", "content": "hi"})
    assert (req.greedy, req.max_tokens, req.stop, req.seed, req.stream, req.include_usage) == \
        (True, 7, ("x",), 3, True, True)
    assert parse({"model": "m", "prompt": ["once"]}, chat=False).prompt == "once"
    assert parse({"model": "m", "prompt": "p", "max_completion_tokens": 2}, chat=False).max_tokens == 2


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "user", "content": "x"}]}, "model"),
    ({"model": "m", "messages": []}, "messages"),
    ({"model": "m", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0]"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": True}, "max_tokens"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": float("nan")}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a"] * 5}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": [""]}, "stop"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}, "stream"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "seed": 1.5}, "seed"),
])
def test_each_bad_field_is_a_400_naming_it(body, param):
    with pytest.raises(ApiError) as e:
        parse(body)
    assert e.value.status == 400 and e.value.param == param
    assert set(error_body(e.value)["error"]) == {"message", "type", "param", "code"}


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b"\xff\xfe", b'"text"'])
def test_a_body_that_is_no_json_object_is_a_400(raw):
    with pytest.raises(ApiError) as e:
        parse_request(raw, chat=True)
    assert e.value.status == 400


@given(st.text(alphabet="ab c", max_size=30), st.lists(st.text(alphabet="ab c", min_size=1, max_size=3),
                                                         min_size=1, max_size=3), st.data())
def test_stop_text_sends_exactly_the_text_before_the_first_stop(text, stops, data):
    """However the text is cut into pieces, what is sent is the text up to the earliest stop string, and
    nothing sent is ever taken back."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=6)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    cut = StopText(tuple(stops))
    sent = "".join(cut.push(p) for p in pieces) + cut.flush()
    first = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    assert sent == text[:first]
    assert cut.stopped == any(s in text for s in stops)


def test_response_shapes():
    req = parse({"model": "m", "messages": [{"role": "user", "content": "x"}]})
    body = completion_body(req, "id1", "hello", "stop", {"prompt_tokens": 1, "completion_tokens": 2,
                                                           "total_tokens": 3})
    assert body["object"] == "chat.completion" and body["choices"][0]["message"]["content"] == "hello"
    assert chunk_body(req, "id1", "", first=True)["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunk_body(req, "id1", None, finish="length")["choices"][0] == {
        "index": 0, "delta": {}, "logprobs": None, "finish_reason": "length"}
    assert chunk_body(req, "id1", None, usage={"total_tokens": 3})["choices"] == []
    text = parse({"model": "m", "prompt": "p"}, chat=False)
    assert chunk_body(text, "id2", "abc")["choices"][0]["text"] == "abc"


async def test_unknown_routes_and_failures_keep_openais_error_shape():
    import httpx
    from starlette.routing import Route

    from mesh.web.app import api_app

    async def broken(request):
        raise RuntimeError("a bug")

    app = api_app(None, None, [Route("/broken", broken)])
    transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        for path, status in (("/v1/nothing", 404), ("/broken", 500)):
            r = await client.get(path)
            assert r.status_code == status
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
        r = await client.get("/v1/chat/completions")
        assert r.status_code == 405 and "error" in r.json()
