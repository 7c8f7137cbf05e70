"""The wire protocol core: parsing, encoding and coalescing, with no sockets."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.wire.coalesce import Frame, StreamRef, Token, coalesce
from gateway.wire.codes import ErrorCode
from gateway.wire.errors import FrameError
from gateway.wire.inbound import (
    AuthMessage,
    CancelMessage,
    GenerateMessage,
    PingMessage,
    PongMessage,
    parse_client_frame,
)
from gateway.wire.outbound import encode_done, encode_error, encode_start, encode_token


def test_generate_with_prompt_and_options() -> None:
    msg = parse_client_frame(json.dumps({
        "type": "generate", "id": "r1", "prompt": "hi", "max_tokens": 5, "temperature": 0.5,
        "top_p": 0.9, "stop": ["\n"], "model": "m",
    }))
    assert isinstance(msg, GenerateMessage)
    assert (msg.id, msg.prompt, msg.max_tokens, msg.temperature, msg.top_p, msg.stop, msg.model) == (
        "r1", "hi", 5, 0.5, 0.9, ["\n"], "m")


def test_generate_with_messages() -> None:
    msg = parse_client_frame('{"type":"generate","messages":[{"role":"user","content":"hello"}]}')
    assert isinstance(msg, GenerateMessage)
    assert msg.id is None and msg.messages is not None and msg.messages[0].content == "hello"
    assert msg.prompt_chars() == 5


def test_plain_text_is_a_prompt() -> None:
    msg = parse_client_frame("tell me a story")
    assert isinstance(msg, GenerateMessage)
    assert msg.prompt == "tell me a story" and msg.id is None


@pytest.mark.parametrize("text", ["[1,2]", "42", '"hi"', "null", "true"])
def test_json_that_is_not_an_object_is_bad_request(text: str) -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame(text)
    assert info.value.code is ErrorCode.BAD_REQUEST


def test_unknown_type() -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame('{"type":"launch","id":"x1"}')
    assert info.value.code is ErrorCode.UNKNOWN_TYPE
    assert info.value.stream_id == "x1"


@pytest.mark.parametrize("frame", [
    {"type": 5},
    {"id": "r1"},
    {"type": "generate"},
    {"type": "generate", "prompt": "a", "messages": [{"role": "user", "content": "b"}]},
    {"type": "generate", "prompt": 5},
    {"type": "generate", "prompt": "a", "max_tokens": "10"},
    {"type": "generate", "prompt": "a", "max_tokens": 0},
    {"type": "generate", "prompt": "a", "temperature": 3},
    {"type": "generate", "prompt": "a", "id": "has space"},
    {"type": "generate", "prompt": "a", "id": "x" * 65},
    {"type": "generate", "messages": []},
    {"type": "generate", "messages": [{"role": "wizard", "content": "b"}]},
    {"type": "cancel"},
    {"type": "cancel", "id": 3},
    {"type": "auth"},
])
def test_invalid_frames_are_bad_request(frame: dict[str, object]) -> None:
    with pytest.raises(FrameError) as info:
        parse_client_frame(json.dumps(frame))
    assert info.value.code is ErrorCode.BAD_REQUEST
    assert info.value.message


def test_error_messages_never_echo_the_input() -> None:
    secret_prompt = "my-secret-prompt-text"
    with pytest.raises(FrameError) as info:
        parse_client_frame(json.dumps({"type": "generate", "prompt": secret_prompt, "max_tokens": secret_prompt}))
    assert secret_prompt not in info.value.message
    assert "max_tokens" in info.value.message


def test_other_messages() -> None:
    assert isinstance(parse_client_frame('{"type":"cancel","id":"r1"}'), CancelMessage)
    assert isinstance(parse_client_frame('{"type":"ping"}'), PingMessage)
    assert isinstance(parse_client_frame('{"type":"pong"}'), PongMessage)
    auth = parse_client_frame('{"type":"auth","token":"abc"}')
    assert isinstance(auth, AuthMessage) and auth.token == "abc"


def test_encoders_produce_the_documented_frames() -> None:
    assert json.loads(encode_start("r1")) == {"type": "start", "id": "r1"}
    assert json.loads(encode_token(json.dumps("r1"), 3, 'a "q"\n')) == {
        "type": "token", "id": "r1", "seq": 3, "text": 'a "q"\n'}
    assert json.loads(encode_done("r1", "stop", 2, 3)) == {
        "type": "done", "id": "r1", "finish_reason": "stop",
        "usage": {"prompt_tokens": 2, "completion_tokens": 3}}
    assert json.loads(encode_error(None, ErrorCode.RATE_LIMITED, "slow down", retry_after_s=1.5)) == {
        "type": "error", "id": None, "code": "rate_limited", "message": "slow down", "retry_after_s": 1.5}


def test_coalesce_merges_waiting_tokens_per_stream() -> None:
    a, b = StreamRef.of("a"), StreamRef.of("b")
    items: list[Frame | Token] = [
        Frame(a, encode_start("a")), Token(a, 0, "x"), Token(b, 0, "1"), Token(a, 1, "y"),
        Token(b, 1, "2"), Frame(a, encode_done("a", "stop", 0, 2)), Token(a, 2, "late?")]
    result = coalesce(items)
    frames = [json.loads(f) for f in result.frames]
    assert frames[0]["type"] == "start"
    assert frames[1] == {"type": "token", "id": "a", "seq": 1, "text": "xy"}
    assert frames[2] == {"type": "token", "id": "b", "seq": 1, "text": "12"}
    assert frames[3]["type"] == "done"
    # A token after a stream's non-token frame starts a new run after that frame.
    assert frames[4] == {"type": "token", "id": "a", "seq": 2, "text": "late?"}
    assert result.tokens == 5
    assert result.merged_frames == 2  # five tokens in three frames


@given(st.lists(st.tuples(st.integers(0, 3), st.text(max_size=3)), max_size=60),
       st.lists(st.integers(1, 20), max_size=10))
def test_coalesce_never_loses_reorders_or_duplicates(tokens: list[tuple[int, str]], cuts: list[int]) -> None:
    """Whatever batches the queue is drained in, each stream's text and seq order survive."""
    refs = [StreamRef.of(f"s{i}") for i in range(4)]
    seqs = [0, 0, 0, 0]
    items = []
    for stream, text in tokens:
        items.append(Token(refs[stream], seqs[stream], text))
        seqs[stream] += 1
    received: dict[str, list[dict[str, object]]] = {}
    position = 0
    for cut in [*cuts, len(items)]:
        batch = items[position:position + cut]
        position += len(batch)
        for frame in coalesce(batch).frames:
            data = json.loads(frame)
            received.setdefault(data["id"], []).append(data)
    for index, ref in enumerate(refs):
        expected = "".join(text for stream, text in tokens if stream == index)
        frames = received.get(ref.id, [])
        assert "".join(str(f["text"]) for f in frames) == expected
        seq_values = [int(str(f["seq"])) for f in frames]
        assert seq_values == sorted(set(seq_values))
        if frames:
            assert seq_values[-1] == seqs[index] - 1


def test_docs_list_every_error_code_and_whether_it_is_worth_retrying() -> None:
    from gateway.wire.codes import RETRYABLE_ERRORS
    from tests.support import ROOT

    text = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
    table = text[text.index("| code | meaning | worth retrying |"):].split("\n\n")[0]
    rows = [line.split("|") for line in table.splitlines()[2:]]
    documented = {cells[1].strip().strip("`"): cells[3].strip().startswith("yes") for cells in rows}
    assert documented == {str(code): code in RETRYABLE_ERRORS for code in ErrorCode}
