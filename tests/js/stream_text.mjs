// The Vercel AI SDK against the gateway's OpenAI-compatible API: `streamText` with the
// OpenAI-compatible provider. Prints one JSON line: the text, the tool calls and how it ended.
// Usage: node stream_text.mjs <baseURL> <token> <text|tool>
import { jsonSchema, streamText, tool } from "ai";
import { createOpenAICompatible } from "@ai-sdk/openai-compatible";

const [baseURL, apiKey, mode] = process.argv.slice(2);
const gateway = createOpenAICompatible({ name: "gateway", baseURL, apiKey, includeUsage: true });
const tools = mode === "tool" ? {
  get_weather: tool({
    description: "The weather in a city",
    inputSchema: jsonSchema({ type: "object", properties: { city: { type: "string" } }, required: ["city"] }),
  }),
} : undefined;
const result = streamText({
  model: gateway("synthetic"),
  prompt: "the quick brown fox jumps",
  maxOutputTokens: 12,
  tools,
  maxRetries: 0,
});
let text = "";
const toolCalls = [];
const errors = [];
for await (const part of result.fullStream) {
  if (part.type === "text-delta") text += part.text;
  else if (part.type === "tool-call") toolCalls.push({ id: part.toolCallId, name: part.toolName, input: part.input });
  else if (part.type === "error") errors.push(String(part.error));
}
console.log(JSON.stringify({ text, toolCalls, errors, finishReason: await result.finishReason, usage: await result.usage }));
