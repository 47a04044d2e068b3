// Smoke test: the official npm SDK (@unkey/api, pinned in package.json) against a keysvc server.
// Reads UNKEY_URL and UNKEY_ROOT_KEY; prints one JSON summary line on stdout; exits non-zero on error.
import { createRequire } from "node:module";
import { Unkey } from "@unkey/api";

const sdkVersion = createRequire(import.meta.url)("@unkey/api/package.json").version;

const serverURL = process.env.UNKEY_URL;
const rootKey = process.env.UNKEY_ROOT_KEY;
if (!serverURL || !rootKey) {
  console.error("UNKEY_URL and UNKEY_ROOT_KEY must be set");
  process.exit(2);
}

// No retries: a server error must fail fast, not after the SDK's default backoff.
const unkey = new Unkey({ rootKey, serverURL, retryConfig: { strategy: "none" } });
const suffix = `${Date.now()}_${Math.random().toString(36).slice(2, 10)}`;

try {
  const api = await unkey.apis.createApi({ name: `npm-smoke-${suffix}` });
  const apiId = api.data.apiId;

  const created = await unkey.keys.createKey({
    apiId,
    prefix: "npm",
    name: `npm-key-${suffix}`,
    meta: { sdk: "npm" },
    credits: { remaining: 10 },
  });

  const verified = await unkey.keys.verifyKey({ key: created.data.key });
  const garbage = await unkey.keys.verifyKey({ key: `npm_garbage_${suffix}` });
  const fetched = await unkey.keys.getKey({ keyId: created.data.keyId });

  const summary = {
    sdkVersion,
    apiId,
    requestId: api.meta.requestId,
    keyId: created.data.keyId,
    keyPrefix: created.data.key.split("_")[0],
    verify: {
      valid: verified.data.valid,
      code: verified.data.code,
      keyId: verified.data.keyId,
      name: verified.data.name,
      meta: verified.data.meta,
      credits: verified.data.credits,
    },
    garbage: { valid: garbage.data.valid, code: garbage.data.code },
    getKey: { keyId: fetched.data.keyId, start: fetched.data.start, remaining: fetched.data.credits?.remaining },
  };
  console.log(JSON.stringify(summary));
} catch (err) {
  console.error(`smoke failed: ${err?.name}: ${err?.message}`);
  if (err?.body) console.error(`body: ${err.body}`);
  process.exit(1);
}
