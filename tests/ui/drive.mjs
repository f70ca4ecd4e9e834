// Drives the dashboard in a real headless Chromium over the DevTools
// protocol (Node's own WebSocket, no npm packages): for each token of
// UI_TOKENS (a JSON array, passed in the environment so no token is ever
// in a URL or on a command line), types it into the page, waits for the
// tenants table and reports what the page shows as JSON on stdout.
//
// usage: node --experimental-websocket drive.mjs <chromium> <page url> <screenshot.png>
import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

const [chromium, url, shot] = process.argv.slice(2);
const tokens = JSON.parse(process.env.UI_TOKENS || "[]");
const jobId = process.env.UI_JOB || "";
const profile = mkdtempSync(join(tmpdir(), "ap-ui-"));
const browser = spawn(chromium, [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
  "--no-first-run", "--no-default-browser-check", "--remote-debugging-port=0",
  `--user-data-dir=${profile}`, "--window-size=1400,1100", "about:blank",
], { stdio: ["ignore", "ignore", "pipe"] });
const fail = (msg) => { console.error(msg); cleanup(); process.exit(1); };
const cleanup = () => { try { browser.kill("SIGKILL"); } catch (_) {} try { rmSync(profile, { recursive: true, force: true }); } catch (_) {} };
setTimeout(() => fail("timed out"), 60000).unref();

const wsUrl = await new Promise((resolve, reject) => {
  let err = "";
  browser.stderr.on("data", (d) => {
    err += d;
    const m = err.match(/DevTools listening on (ws:\/\/\S+)/);
    if (m) resolve(m[1]);
  });
  browser.on("exit", (c) => reject(new Error("chromium exited " + c + ": " + err)));
}).catch((e) => fail(e.message));
const port = new URL(wsUrl).port;
const targets = await (await fetch(`http://127.0.0.1:${port}/json/list`)).json();
const page = targets.find((t) => t.type === "page");
const ws = new WebSocket(page.webSocketDebuggerUrl);
await new Promise((r, j) => { ws.onopen = r; ws.onerror = j; });
let seq = 0;
const pending = new Map();
ws.onmessage = (m) => {
  const msg = JSON.parse(m.data);
  if (msg.id && pending.has(msg.id)) {
    const { resolve, reject } = pending.get(msg.id);
    pending.delete(msg.id);
    msg.error ? reject(new Error(JSON.stringify(msg.error))) : resolve(msg.result);
  }
};
const send = (method, params = {}) => new Promise((resolve, reject) => {
  const id = ++seq;
  pending.set(id, { resolve, reject });
  ws.send(JSON.stringify({ id, method, params }));
});
const evaluate = async (expr) => {
  const r = await send("Runtime.evaluate", { expression: expr, returnByValue: true, awaitPromise: true });
  if (r.exceptionDetails) throw new Error(JSON.stringify(r.exceptionDetails));
  return r.result.value;
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const until = async (expr, what) => {
  for (let i = 0; i < 150; i++) {
    if (await evaluate(expr)) return;
    await sleep(100);
  }
  fail("page never showed " + what + ": " + await evaluate("document.body.innerText"));
};

await send("Page.enable");
await send("Emulation.setDeviceMetricsOverride", { width: 1400, height: 1100, deviceScaleFactor: 1, mobile: false });
await send("Page.navigate", { url });
await until(`document.readyState === "complete" && !!document.getElementById("token")`, "the login form");

const out = [];
for (const [i, token] of tokens.entries()) {
  // Typed into the field as a user would, then submitted.
  await evaluate(`document.getElementById("tenants").tBodies[0].innerHTML = ""; document.getElementById("token").focus()`);
  await send("Input.insertText", { text: token });
  await evaluate(`document.getElementById("connect").click()`);
  await until(`document.querySelectorAll("#tenants tbody tr").length > 0`, "the tenants table");
  // Two more polls (every 3 s) so the plots over time have lines.
  await sleep(6500);
  const seen = await evaluate(`({
    who: document.getElementById("who").textContent,
    status: document.getElementById("status").textContent,
    rows: [...document.querySelectorAll("#tenants tbody tr")].map((tr) => [...tr.cells].map((c) => c.textContent)),
    share_paths: document.querySelectorAll("#share path").length,
    queue_paths: document.querySelectorAll("#queue path").length,
    credit_bars: document.querySelectorAll("#credits rect").length,
    failure_bars: [...document.querySelectorAll("#failures text")].map((t) => t.textContent),
    token_field: document.getElementById("token").value,
    stored: localStorage.length + sessionStorage.length + document.cookie.length,
    href: location.href,
  })`);
  if (i === 0 && shot) {
    const png = await send("Page.captureScreenshot", { format: "png" });
    writeFileSync(shot, Buffer.from(png.data, "base64"));
  }
  if (jobId) {
    await evaluate(`document.getElementById("jobid").value = ${JSON.stringify(jobId)}; document.querySelector("#jobform button").click()`);
    await until(`document.getElementById("log").textContent.length > 0`, "the job's log");
    seen.job = await evaluate(`document.getElementById("job").textContent`);
    seen.log = await evaluate(`document.getElementById("log").textContent`);
  }
  out.push(seen);
}
console.log(JSON.stringify(out));
ws.close();
cleanup();
process.exit(0);
