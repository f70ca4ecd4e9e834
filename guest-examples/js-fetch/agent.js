// A JavaScript agent built with componentize-js and its default features
// (so it imports `wasi:http/outgoing-handler` for `fetch`, among others):
// calls an HTTP API with `fetch`, under its tenant's allowed_outbound_hosts.
//
// Input (JSON): {"url": "..."}. Output (JSON): {"status", "body"} (a
// redirect comes back as it is: the host follows none); a refused or
// failed request rejects, and the agent answers Err("fetch <url>: <why>").
import { write } from 'agentplane:agent/log@0.1.1';

export async function run(input) {
  const req = JSON.parse(input);
  let res;
  try {
    res = await fetch(req.url);
  } catch (e) {
    throw `fetch ${req.url}: ${e}`;
  }
  const body = await res.text();
  write('info', `fetched ${req.url}: ${res.status}`);
  return JSON.stringify({ status: res.status, body });
}
