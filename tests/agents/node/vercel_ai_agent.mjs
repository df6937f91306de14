// Vercel's AI SDK: generateText with a tool (Chat Completions through @ai-sdk/openai), one paid tool
// called with Node's fetch. Configured as the Python agents are (tests/agents/common.py).
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, stepCountIs, tool } from "ai";
import { z } from "zod";

import { charge } from "./paid_tool.mjs";

const openai = createOpenAI({ baseURL: `${process.env.FAKE_LLM}/v1`, apiKey: "sk-test" });
const result = await generateText({
  model: openai.chat("m"),
  prompt: "Please bill the customer.",
  tools: { charge: tool({ description: "Charge the customer.", inputSchema: z.object({ amount: z.number().int() }),
                          execute: async ({ amount }) => charge(amount) }) },
  stopWhen: stepCountIs(5),
  maxRetries: 0,
});
process.stdout.write(`final: ${result.text}\n`);
