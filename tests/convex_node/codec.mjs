// Convex's own value codec (convex/values), one JSON request per stdin line, one JSON
// answer per stdout line, so a whole corpus runs in this one process.
//
//   {"op": "roundtrip", "json": X}   -> {"ok": true, "json": convexToJson(jsonToConvex(X)),
//                                       "same": <that equals X, fields in the same order>}
//                                       or {"ok": false, "error": "..."}
//   {"op": "encodeKey", "key": K}    -> convexToJson({[K]: 1}), or the error
//   {"op": "encodeBigInt", "decimal": D} -> convexToJson(BigInt(D)), or the error
//   {"op": "samples"}                -> {"ok": true, "json": {name: convexToJson(value)}}
import { createInterface } from "node:readline";
import { convexToJson, jsonToConvex } from "convex/values";

function bytes(...values) {
  return new Uint8Array(values).buffer;
}

const SAMPLES = {
  int64Min: -(2n ** 63n),
  int64Max: 2n ** 63n - 1n,
  int64Zero: 0n,
  int64MinusOne: -1n,
  int64Big: 1234567890123456789n,
  negativeZero: -0,
  nan: NaN,
  infinity: Infinity,
  negativeInfinity: -Infinity,
  zero: 0,
  maxSafe: Number.MAX_SAFE_INTEGER,
  twoTo60: 2 ** 60,
  huge: 1e300,
  tiny: 5e-324,
  oneE21: 1e21,
  third: 1 / 3,
  emptyBytes: new ArrayBuffer(0),
  someBytes: bytes(0, 1, 2, 254, 255),
  emptyString: "",
  unicode: "héllo \u{1F600} \u0000 \u202e",
  nested: { b: [1n, null, true, bytes(7)], a: { "": -0, _id: "x" } },
};

function answer(request) {
  switch (request.op) {
    case "roundtrip": {
      const json = convexToJson(jsonToConvex(request.json));
      return { ok: true, json, same: JSON.stringify(json) === JSON.stringify(request.json) };
    }
    case "encodeKey":
      return { ok: true, json: convexToJson({ [request.key]: 1 }) };
    case "encodeBigInt":
      return { ok: true, json: convexToJson(BigInt(request.decimal)) };
    case "samples":
      return {
        ok: true,
        json: Object.fromEntries(
          Object.entries(SAMPLES).map(([name, value]) => [name, convexToJson(value)]),
        ),
      };
    default:
      throw new Error(`unknown op ${request.op}`);
  }
}

for await (const line of createInterface({ input: process.stdin, crlfDelay: Infinity })) {
  let reply;
  try {
    reply = answer(JSON.parse(line));
  } catch (error) {
    reply = { ok: false, error: String(error?.message ?? error) };
  }
  process.stdout.write(JSON.stringify(reply) + "\n");
}
