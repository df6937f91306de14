// The paid tool every Node agent calls (as tests/agents/common.py's charge): a payment through the
// proxy with Node's fetch, then, with CRASH=1, death by SIGKILL right after it.
export async function charge(amount) {
  const answer = await fetch(`${process.env.PAID_API}/v1/payments`, {
    method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify({ amount }) });
  if (!answer.ok) throw new Error(`charge: ${answer.status}`);
  const result = (await answer.text()).trim();
  process.stdout.write(`tool: ${result}\n`);
  if (process.env.CRASH === "1") process.kill(process.pid, "SIGKILL");
  return result;
}
