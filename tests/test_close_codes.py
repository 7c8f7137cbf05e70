"""One close-code policy: the protocol's table (gateway.wire.codes.CLOSE_RULES) against the
Python client, the browser SDK's copy (run under node) and docs/protocol.md."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from typing import Any

import pytest

import gateway.client
from gateway.wire import BEARER_SUBPROTOCOL_PREFIX, PROTOCOL
from gateway.wire.codes import CLOSE_RULES, describe_close, should_reconnect
from tests.support import ROOT

CLIENT_JS = ROOT / "gateway" / "client" / "static" / "client.js"
# Codes no table names: a 1005 (a close frame without a code), a proxy's or an app's own.
UNKNOWN_CODES = (1005, 1012, 3000, 4999)


def run_module(script: str) -> Any:
    """Run ``script`` as an ES module under node, with the SDK imported as ``sdk``; returns
    what it printed, as JSON."""
    node = shutil.which("node")
    if node is None:
        if os.environ.get("CI") == "true":
            pytest.fail("node is not installed (apt-get install nodejs) and CI=true")
        pytest.skip("node is not installed")
    source = (
        # CustomEvent is a global from node 19 on; the SDK only needs its detail.
        "globalThis.CustomEvent ??= class extends Event {\n"
        "  constructor(type, options = {}) { super(type); this.detail = options.detail; }\n"
        "};\n"
        f"const sdk = await import({json.dumps(CLIENT_JS.as_uri())});\n" + script
    )
    done = subprocess.run([node, "--input-type=module"], input=source, capture_output=True, text=True,
                          timeout=30, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_python_client_has_no_policy_of_its_own() -> None:
    assert gateway.client.should_reconnect is should_reconnect
    assert gateway.client.describe_close is describe_close
    assert {int(code): rule.meaning for code, rule in CLOSE_RULES.items()} == gateway.client.CLOSE_REASONS


def test_the_browser_sdk_copy_is_the_wire_table() -> None:
    probes = [*map(int, CLOSE_RULES), *UNKNOWN_CODES]
    seen = run_module(f"""
const probes = {json.dumps(probes)};
console.log(JSON.stringify({{
  protocol: sdk.PROTOCOL,
  bearer: sdk.BEARER_SUBPROTOCOL_PREFIX,
  rules: sdk.CLOSE_RULES,
  reasons: sdk.CLOSE_REASONS,
  reconnect: Object.fromEntries(probes.map((code) => [code, sdk.shouldReconnect(code)])),
  described: Object.fromEntries(
    probes.map((code) => [code, [sdk.describeClose(code), sdk.describeClose(code, "why")]])),
  drop: [sdk.shouldReconnect(null), sdk.shouldReconnect(undefined), sdk.describeClose(null), sdk.describeClose()],
}}));
""")
    assert seen["protocol"] == PROTOCOL
    assert seen["bearer"] == BEARER_SUBPROTOCOL_PREFIX
    assert seen["rules"] == {str(int(code)): {"reconnect": rule.reconnect, "meaning": rule.meaning}
                             for code, rule in CLOSE_RULES.items()}
    assert seen["reasons"] == {str(int(code)): rule.meaning for code, rule in CLOSE_RULES.items()}
    assert seen["reconnect"] == {str(code): should_reconnect(code) for code in probes}
    assert all(seen["reconnect"][str(code)] for code in UNKNOWN_CODES)
    assert seen["described"] == {str(code): [describe_close(code), describe_close(code, "why")] for code in probes}
    # A drop without a close frame: no code at all, retried, and shown as 1006.
    assert seen["drop"] == [should_reconnect(None), should_reconnect(None), describe_close(None), describe_close(None)]
    assert seen["drop"][0] is True and seen["drop"][2].startswith("1006: ")


def test_the_browser_client_reconnects_or_stops_as_the_table_says() -> None:
    """The SDK's own connection, on a fake WebSocket: the handshake offers the protocol and
    the token, and each close code leads to ``reconnecting`` or ``closed`` as the table says."""
    codes = [*map(int, CLOSE_RULES), *UNKNOWN_CODES]
    seen = run_module(f"""
let made;
class FakeSocket {{
  constructor(url, protocols) {{ this.url = String(url); this.protocols = protocols; this.readyState = 1; made(this); }}
  send() {{}}
  close() {{}}
}}
const out = {{}};
for (const code of {json.dumps(codes)}) {{
  const socketMade = new Promise((resolve) => {{ made = resolve; }});
  const client = sdk.connect({{ url: "ws://gateway.invalid/ws", token: "t0k", WebSocket: FakeSocket }});
  const states = [];
  client.addEventListener("state", (event) => states.push(event.detail));
  const socket = await socketMade;
  socket.onmessage({{ data: JSON.stringify({{ type: "hello", user: "u" }}) }});
  socket.onclose({{ code, reason: "" }});
  const last = states[states.length - 1];
  out[code] = {{ protocols: socket.protocols, state: last.state, code: last.code }};
  client.close();
}}
console.log(JSON.stringify(out));
""")
    for code in codes:
        assert seen[str(code)] == {
            "protocols": [PROTOCOL, BEARER_SUBPROTOCOL_PREFIX + "t0k"],
            # An expired token (4001) cannot be renewed from a fixed string: the SDK stops.
            "state": "reconnecting" if should_reconnect(code) and code != 4001 else "closed",
            "code": code,
        }, code


def test_the_browser_client_reconnects_after_4001_with_a_token_function_asking_it_again() -> None:
    seen = run_module("""
let made;
class FakeSocket {
  constructor(url, protocols) { this.url = String(url); this.protocols = protocols; this.readyState = 1; made(this); }
  send() {}
  close() {}
}
let asked = 0;
const token = async () => `fresh-${++asked}`;
let socketMade = new Promise((resolve) => { made = resolve; });
const client = sdk.connect({ url: "ws://gateway.invalid/ws", token, WebSocket: FakeSocket, minBackoffMs: 1 });
const states = [];
client.addEventListener("state", (event) => states.push(event.detail.state));
const first = await socketMade;
socketMade = new Promise((resolve) => { made = resolve; });
first.onmessage({ data: JSON.stringify({ type: "hello", user: "u" }) });
first.onclose({ code: 4001, reason: "token expired" });
const second = await socketMade;
client.close();
console.log(JSON.stringify({ states, first: first.protocols, second: second.protocols, asked }));
""")
    assert "reconnecting" in seen["states"]
    assert seen["first"] == [PROTOCOL, BEARER_SUBPROTOCOL_PREFIX + "fresh-1"]
    assert seen["second"] == [PROTOCOL, BEARER_SUBPROTOCOL_PREFIX + "fresh-2"]
    assert seen["asked"] == 2


def test_the_protocol_doc_lists_every_close_code_with_its_retry_policy() -> None:
    text = (ROOT / "docs" / "protocol.md").read_text()
    section = text.split("\n## Close codes\n", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| (\d+) \| [^|]+ \| ([^|]+) \|$", section, flags=re.M)
    assert rows, "no close-code table in docs/protocol.md"
    documented = {int(code): retry.strip().split(",")[0] for code, retry in rows}
    assert len(documented) == len(rows), "a close code has two rows"
    assert documented == {int(code): "yes" if rule.reconnect else "no" for code, rule in CLOSE_RULES.items()}
