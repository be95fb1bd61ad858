// The reconnect delay: full jitter between 0 and the capped exponential step.

import assert from "node:assert/strict";
import { test } from "node:test";

import { backoffDelay } from "../roomcast.js";

const cap = (attempt, min = 500, max = 15000) => Math.min(max, min * 2 ** attempt);

test("the delay is 0 at the bottom of the jitter and just under the step at the top", () => {
  for (let attempt = 0; attempt < 12; attempt++) {
    assert.equal(backoffDelay(attempt, {}, () => 0), 0);
    assert.equal(backoffDelay(attempt, {}, () => 1 - 2 ** -40), cap(attempt) - 1, `attempt ${attempt}`);
  }
});

test("the step doubles from minDelay and stops at maxDelay, even after very many attempts", () => {
  const top = () => 1 - 2 ** -40;
  const options = { minDelay: 100, maxDelay: 3000 };
  assert.deepEqual(
    [0, 1, 2, 3, 4, 5, 6].map((n) => backoffDelay(n, options, top)),
    [99, 199, 399, 799, 1599, 2999, 2999],
  );
  for (const attempt of [64, 1024, 1e9]) {
    const delay = backoffDelay(attempt, options, top);
    assert.ok(Number.isFinite(delay) && delay === 2999, `attempt ${attempt}: ${delay}`);
  }
});

test("with a real random source every delay is within its bounds and they spread over the range", () => {
  for (let attempt = 0; attempt < 8; attempt++) {
    const delays = Array.from({ length: 2000 }, () => backoffDelay(attempt));
    for (const delay of delays) {
      assert.ok(Number.isInteger(delay) && delay >= 0 && delay < cap(attempt), `attempt ${attempt}: ${delay}`);
    }
    // Full jitter: not bunched at the step (the odds of failing this by chance are below 2^-800).
    assert.ok(Math.min(...delays) < cap(attempt) / 4, `attempt ${attempt}: nothing in the bottom quarter`);
    assert.ok(Math.max(...delays) >= (cap(attempt) * 3) / 4, `attempt ${attempt}: nothing in the top quarter`);
  }
});
