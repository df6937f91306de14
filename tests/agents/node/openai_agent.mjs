// The npm openai package's tool loop (Chat Completions), with one paid tool called with Node's fetch.
// Configured as the Python agents are (tests/agents/common.py): FAKE_LLM, PAID_API, CRASH=1.
import OpenAI from "openai";

import { charge } from "./paid_tool.mjs";

const client = new OpenAI({ baseURL: `${process.env.FAKE_LLM}/v1`, apiKey: "sk-test", maxRetries: 0 });
const tools = [{ type: "function", function: { name: "charge", description: "Charge the customer.",
  parameters: { type: "object", properties: { amount: { type: "integer" } }, required: ["amount"] } } }];

const messages = [{ role: "user", content: "Please bill the customer." }];
for (;;) {
  const message = (await client.chat.completions.create({ model: "m", messages, tools })).choices[0].message;
  if (!message.tool_calls?.length) {
    process.stdout.write(`final: ${message.content}\n`);
    break;
  }
  messages.push(message);
  for (const call of message.tool_calls) {
    messages.push({ role: "tool", tool_call_id: call.id, content: await charge(JSON.parse(call.function.arguments).amount) });
  }
}
