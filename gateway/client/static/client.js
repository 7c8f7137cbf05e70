// Browser SDK for the token gateway (protocol gateway.v1). One ES module, no dependencies.
//
//   import { connect } from "https://gateway.example/client.js";
//   const client = connect({ url: "wss://gateway.example/ws", token });
//   const answer = client.generate("Hello");
//   for await (const text of answer) output.textContent += text;
//   const terminal = await answer.done;   // {"type":"done",…} or {"type":"error",…}
//
// Everything else a model streams comes as typed parts: `for await (const part of
// answer.parts())` yields {kind: "text", text}, {kind: "reasoning", text} and
// {kind: "tool_call", index, callId, name, arguments} (a fragment); `answer.reasoning` and
// `answer.toolCalls` (assembled, [{id, type: "function", function: {name, arguments}}]) hold
// what arrived, and a "done" terminal frame carries the calls as `tool_calls`.
//
// Guarantee: each part is yielded once and in order, across any number of
// reconnects, or the generation ends with an "error" terminal frame saying why not. The
// client reconnects with exponential backoff and jitter (1 s up to 30 s), never after a
// close that retrying cannot fix (1000, 1008, 1009; 4001 with a fixed token), and after each reconnect resumes every
// running generation from the last seq it received. Docs: docs/client-js.md.

export const PROTOCOL = "gateway.v1";
// A browser cannot set headers on a WebSocket handshake: the token goes as the subprotocol
// "bearer.<token>" beside PROTOCOL.
export const BEARER_SUBPROTOCOL_PREFIX = "bearer.";
export const MIN_BACKOFF_MS = 1000;
export const MAX_BACKOFF_MS = 30000;
const HEARTBEAT_MISSES = 3;

// Error codes the client itself puts in a generation's terminal frame.
export const DISCONNECTED = "disconnected";
export const STREAM_LOST = "stream_lost";

// Every close code of the protocol: whether a client reconnects after it, and what it means.
// The server's table (gateway/wire/codes.py) is the original; the tests check this copy.
export const CLOSE_RULES = {
  1000: { reconnect: false, meaning: "closed normally" },
  1001: { reconnect: true, meaning: "the server is shutting down" },
  1006: { reconnect: true, meaning: "the connection dropped (network), or the server refused the handshake" },
  1008: { reconnect: false, meaning: "authentication refused, or policy violated" },
  1009: { reconnect: false, meaning: "a message was larger than the server accepts" },
  1011: { reconnect: true, meaning: "internal server error" },
  1013: { reconnect: true, meaning: "the server is full or this user has too many connections" },
  4000: { reconnect: true, meaning: "heartbeat timeout: nothing was heard for too long" },
  4001: { reconnect: true, meaning: "the access token expired: reconnect with a fresh one" },
  4003: { reconnect: true, meaning: "slow consumer: messages were not read fast enough" },
};

export const CLOSE_REASONS = Object.fromEntries(
  Object.entries(CLOSE_RULES).map(([code, rule]) => [code, rule.meaning]));

function closeRule(code) {
  return Object.prototype.hasOwnProperty.call(CLOSE_RULES, code) ? CLOSE_RULES[code] : undefined;
}

/** Whether a close with this code is worth a reconnect. No code (a drop without a close
 *  frame) and codes the table does not know (a proxy's own) are. */
export function shouldReconnect(code) {
  const rule = closeRule(code);
  return rule === undefined || rule.reconnect;
}

/** Milliseconds before reconnect `attempt` (0 for the first): uniform between the minimum
 *  and an exponentially growing ceiling capped at the maximum. */
export function backoffDelay(attempt, min = MIN_BACKOFF_MS, max = MAX_BACKOFF_MS, random = Math.random) {
  const ceiling = Math.min(max, min * 2 ** (Math.min(attempt, 30) + 1));
  return min + random() * (ceiling - min);
}

/** A close code as a sentence; no code is a drop, 1006. */
export function describeClose(code, reason = "") {
  const shown = code || 1006;
  const rule = closeRule(shown);
  return `${shown}: ${rule ? rule.meaning : "closed"}` + (reason ? ` (${reason})` : "");
}

function newId() {
  const bytes = new Uint8Array(8);
  crypto.getRandomValues(bytes);
  return "js-" + Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

function wsUrl(url) {
  const base = typeof location !== "undefined" ? location.href : undefined;
  const parsed = new URL(url ?? "/ws", base);
  if (parsed.protocol === "http:") parsed.protocol = "ws:";
  if (parsed.protocol === "https:") parsed.protocol = "wss:";
  return parsed;
}

function cancelledFrame(id) {
  return { type: "done", id, finish_reason: "cancelled", usage: { prompt_tokens: 0, completion_tokens: 0 } };
}

/** One answer: an async iterator of its text, `parts()` for every part typed, and `done`,
 *  a promise of its terminal frame. */
export class Generation {
  constructor(client, id, request) {
    this.client = client;
    this.id = id;
    this.request = request;
    this.epoch = null;
    this.lastSeq = -1;
    this.text = "";
    this.reasoning = "";
    this.terminal = null;
    this.createdAt = performance.now();
    this.firstTokenAt = null;
    this.finishedAt = null;
    this._sent = false;
    this._resuming = false;
    this._cancelRequested = false;
    this._parts = [];
    this._calls = [];  // by index: {id, type, function: {name, arguments}}
    this._wakers = [];
    this._listeners = [];
    this._partListeners = [];
    this.done = new Promise((resolve) => { this._resolve = resolve; });
  }

  /** Deltas received so far, of every kind: the last seq plus one. */
  get tokens() { return this.lastSeq + 1; }

  /** The tool calls so far, assembled, in the shape an assistant message sends them back. */
  get toolCalls() { return this._calls.filter(Boolean).map((c) => ({ ...c, function: { ...c.function } })); }

  /** Called with each piece of answer text as it arrives (an alternative to iterating). */
  onText(listener) { this._listeners.push(listener); return this; }

  /** Called with each part as it arrives: {kind: "text"|"reasoning"|"tool_call", …}. */
  onPart(listener) { this._partListeners.push(listener); return this; }

  cancel() { this.client.cancel(this.id); }

  /** The answer's text, piece by piece (other parts are skipped: see parts()). */
  async *[Symbol.asyncIterator]() {
    for await (const part of this.parts()) if (part.kind === "text") yield part.text;
  }

  /** Every part as it arrives, typed. Each iterator sees every part from the start. */
  async *parts() {
    let cursor = 0;
    while (true) {
      if (cursor < this._parts.length) { yield this._parts[cursor++]; continue; }
      if (this.terminal) return;
      await new Promise((resolve) => { this._wakers.push(resolve); });
    }
  }

  _push(part) {
    if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
    if (part.kind === "text") this.text += part.text;
    else if (part.kind === "reasoning") this.reasoning += part.text;
    else {
      const call = this._calls[part.index] ??= { id: "", type: "function", function: { name: "", arguments: "" } };
      call.id ||= part.callId ?? "";
      call.function.name ||= part.name ?? "";
      call.function.arguments += part.arguments;
    }
    this._parts.push(part);
    if (part.kind === "text") for (const listener of this._listeners) listener(part.text);
    for (const listener of this._partListeners) listener(part);
    this._notify();
  }

  _end(frame) {
    if (frame.type === "done" && this._calls.length) frame = { ...frame, tool_calls: this.toolCalls };
    this.terminal = frame;
    this.finishedAt = performance.now();
    this._resolve(frame);
    this._notify();
  }

  _notify() {
    const wakers = this._wakers;
    this._wakers = [];
    for (const wake of wakers) wake();
  }
}

/** The part a delta frame carries, or null for one this client cannot read. */
function partOf(frame) {
  if (frame.type === "tool_call") {
    if (typeof frame.index !== "number" || typeof frame.arguments !== "string") return null;
    return { kind: "tool_call", index: frame.index, callId: frame.call_id, name: frame.name,
             arguments: frame.arguments };
  }
  if (typeof frame.text !== "string") return null;
  return { kind: frame.type === "token" ? "text" : "reasoning", text: frame.text };
}

/**
 * A connection that survives drops. Events (an EventTarget):
 * - "state": detail {state: "connecting"|"open"|"reconnecting"|"closed", code, reason, delayMs, opened}
 * - "hello": detail is the server's hello frame
 * - "error": detail is an error frame that belongs to no generation ("id": null)
 */
export class GatewayClient extends EventTarget {
  constructor({ url, token, auth = "subprotocol", reconnect = true, minBackoffMs = MIN_BACKOFF_MS,
                maxBackoffMs = MAX_BACKOFF_MS, WebSocket: Socket = globalThis.WebSocket } = {}) {
    super();
    this.url = wsUrl(url);
    this.token = token;
    this.auth = auth;
    this.reconnect = reconnect;
    this.minBackoffMs = minBackoffMs;
    this.maxBackoffMs = maxBackoffMs;
    this.Socket = Socket;
    this.state = "connecting";
    this.hello = null;
    this.opens = 0;
    this.lastClose = null;
    this.generations = new Map();
    this._socket = null;
    this._open = false;
    this._attempt = 0;
    this._timer = null;
    this._silence = null;
    this._closed = false;
    queueMicrotask(() => this._connect());
  }

  /** Start a generation: `input` is a prompt string or a list of {role, content}. `options`
   *  are the generate fields (max_tokens, temperature, top_p, stop, model) and `id`. */
  generate(input, options = {}) {
    if (this._closed) throw new Error("the client is closed");
    const { id = newId(), ...fields } = options;
    if (this.generations.has(id)) throw new Error("a generation with this id is already running");
    const request = { type: "generate", id, ...fields };
    if (typeof input === "string") request.prompt = input; else request.messages = input;
    const generation = new Generation(this, id, request);
    this.generations.set(id, generation);
    if (this._open) { generation._sent = true; this._send(request); }
    return generation;
  }

  /** Ask the server to stop a generation; it ends with "done", finish_reason "cancelled". */
  cancel(id) {
    const generation = this.generations.get(id);
    if (!generation || generation._cancelRequested) return;
    generation._cancelRequested = true;
    if (!generation._sent) { this._finish(generation, cancelledFrame(id)); return; }
    if (this._open) this._send({ type: "cancel", id });
  }

  /** Cancel what is running, close with 1000 and stop reconnecting. */
  close() {
    if (this._closed) return;
    this._closed = true;
    clearTimeout(this._timer);
    clearTimeout(this._silence);
    const socket = this._socket;
    if (socket && this._open) {
      for (const id of this.generations.keys()) this._send({ type: "cancel", id });
    }
    this._detach();
    if (socket) socket.close(1000, "client closed");
    this._endAll("the client was closed");
    this._setState({ state: "closed", code: 1000 });
  }

  /** Resolves with the hello of the next open connection (at once when one is open). */
  ready() {
    if (this._open) return Promise.resolve(this.hello);
    return new Promise((resolve, reject) => {
      const onState = (event) => {
        if (event.detail.state === "open") { this.removeEventListener("state", onState); resolve(this.hello); }
        if (event.detail.state === "closed") {
          this.removeEventListener("state", onState);
          reject(new Error("connection closed: " + describeClose(event.detail.code, event.detail.reason)));
        }
      };
      this.addEventListener("state", onState);
    });
  }

  // Connection ---------------------------------------------------------------------------

  async _connect() {
    if (this._closed) return;
    this._setState({ state: "connecting" });
    let token = this.token;
    if (typeof token === "function") {
      try {
        token = await token();
      } catch (error) {
        this._lost(1006, "could not get a token: " + String(error && error.message || error), false);
        return;
      }
    }
    const url = new URL(this.url);
    const protocols = [PROTOCOL];
    if (token && this.auth === "subprotocol") protocols.push(BEARER_SUBPROTOCOL_PREFIX + token);
    if (token && this.auth === "query") url.searchParams.set("token", token);
    let socket;
    try {
      socket = new this.Socket(url, protocols);
    } catch (error) {
      this._lost(1006, String(error && error.message || error), false);
      return;
    }
    this._socket = socket;
    let opened = false;
    socket.onopen = () => {
      if (token && this.auth === "message") socket.send(JSON.stringify({ type: "auth", token }));
    };
    socket.onmessage = (event) => {
      let frame;
      try { frame = JSON.parse(event.data); } catch { return; }
      if (!frame || typeof frame !== "object") return;
      this._heard();
      if (!opened) {
        if (frame.type !== "hello") return;
        opened = true;
        this._onHello(frame);
        return;
      }
      this._onFrame(frame);
    };
    socket.onclose = (event) => {
      if (this._socket !== socket) return;
      this._detach();
      this._lost(event.code, event.reason, opened);
    };
  }

  _onHello(hello) {
    this.hello = hello;
    this._open = true;
    this._attempt = 0;
    this.opens += 1;
    this._heartbeatMs = typeof hello.heartbeat_s === "number"
      ? Math.max(hello.heartbeat_s * 1000 * HEARTBEAT_MISSES, 5000) : null;
    this._heard();
    this.dispatchEvent(new CustomEvent("hello", { detail: hello }));
    this._setState({ state: "open" });
    // Resume what was running from the last seq seen; send what was waiting. A generate
    // with no start yet may never have reached the server: its resume gets not_found,
    // and then it goes out again (see _onFrame).
    for (const g of this.generations.values()) {
      if (g._sent) {
        g._resuming = true;
        this._send({ type: "resume", id: g.id, after: g.lastSeq });
        if (g._cancelRequested) this._send({ type: "cancel", id: g.id });
      } else {
        g._sent = true;
        this._send(g.request);
      }
    }
  }

  _onFrame(frame) {
    if (frame.type === "ping") { this._send({ type: "pong" }); return; }
    if (frame.type === "error" && frame.id == null) {
      this.dispatchEvent(new CustomEvent("error", { detail: frame }));
      return;
    }
    const g = typeof frame.id === "string" ? this.generations.get(frame.id) : undefined;
    if (!g) return;
    switch (frame.type) {
      case "token":
      case "reasoning":
      case "tool_call": {
        // Every kind shares one seq space, and a frame carries the deltas up to and
        // including its seq: one already seen is a replay.
        const part = partOf(frame);
        if (typeof frame.seq !== "number" || frame.seq <= g.lastSeq || part === null) return;
        g.lastSeq = frame.seq;
        g._push(part);
        return;
      }
      case "start":
        if (frame.resumed) {
          g._resuming = false;
          if (g.epoch !== null && frame.epoch !== g.epoch) {
            this._finish(g, { type: "error", id: g.id, code: STREAM_LOST,
                              message: "the generation is no longer available on the server" });
            return;
          }
        }
        if (typeof frame.epoch === "string") g.epoch = frame.epoch;
        return;
      case "done":
        this._finish(g, frame);
        return;
      case "error":
        if (g._resuming && frame.code === "not_found" && g.epoch === null) {
          g._resuming = false;
          if (g._cancelRequested) this._finish(g, cancelledFrame(g.id));
          else this._send(g.request);
          return;
        }
        if (g._cancelRequested && frame.code === "not_found" && !g._resuming) return;
        this._finish(g, frame);
        return;
    }
  }

  _lost(code, reason, opened) {
    this._open = false;
    for (const g of this.generations.values()) g._resuming = false;
    this.lastClose = { code, reason };
    if (this._closed) return;
    // An expired token (4001) is worth a reconnect only with a token function to get a
    // fresh one from; the same string would be refused. Then the answers resume.
    const renewable = code !== 4001 || typeof this.token === "function";
    if (!this.reconnect || !shouldReconnect(code) || !renewable) {
      this._closed = true;
      this._endAll(describeClose(code, reason));
      this._setState({ state: "closed", code, reason, opened });
      return;
    }
    const delayMs = backoffDelay(this._attempt, this.minBackoffMs, this.maxBackoffMs);
    this._attempt += 1;
    this._setState({ state: "reconnecting", code, reason, delayMs, opened });
    this._timer = setTimeout(() => this._connect(), delayMs);
  }

  _heard() {
    clearTimeout(this._silence);
    if (!this._open || !this._heartbeatMs) return;
    const socket = this._socket;
    // A half-open connection: nothing, not even the server's ping. Closing it cleanly could
    // wait for a peer that is gone, so it is abandoned and a new one is opened.
    this._silence = setTimeout(() => {
      if (this._socket !== socket) return;
      this._detach();
      try { socket.close(4000, "heartbeat timeout"); } catch { /* already closed */ }
      this._lost(4000, "heartbeat timeout", true);
    }, this._heartbeatMs);
  }

  _detach() {
    const socket = this._socket;
    this._socket = null;
    this._open = false;
    clearTimeout(this._silence);
    if (socket) { socket.onopen = socket.onmessage = socket.onclose = null; }
  }

  _send(frame) {
    const socket = this._socket;
    // A frame that cannot go out now is covered by the resume after the next connect.
    if (socket && socket.readyState === 1) socket.send(JSON.stringify(frame));
  }

  _finish(generation, frame) {
    if (this.generations.get(generation.id) === generation) this.generations.delete(generation.id);
    generation._end(frame);
  }

  _endAll(reason) {
    for (const g of [...this.generations.values()]) {
      this._finish(g, { type: "error", id: g.id, code: DISCONNECTED,
                        message: "the connection closed before the generation ended: " + reason });
    }
  }

  _setState(detail) {
    if (detail.state === this.state && (detail.state === "open" || detail.state === "closed")) return;
    this.state = detail.state;
    this.dispatchEvent(new CustomEvent("state", { detail }));
  }
}

/** Open a client: `connect({url, token})`. `url` defaults to /ws on the page's host;
 *  `token` may be a string or a function returning one (or a promise of one), called on
 *  each connect so a reconnect can use a fresh token. */
export function connect(options = {}) {
  return new GatewayClient(options);
}
