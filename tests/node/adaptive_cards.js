// Validates Teams Workflows messages with Microsoft's Adaptive Cards library (the `adaptivecards`
// npm package, pinned in package.json / package-lock.json), not with cvchain's code.
//
//     node tests/node/adaptive_cards.js < messages.json
//
// stdin: a JSON array of message bodies as posted to a Workflows webhook. For each message's
// card: parsed by the library for Adaptive Cards 1.5 (what Teams renders); every parse event
// (an unknown element, an invalid value, a version too new) and every validation failure is an
// error, as is a card whose elements do not all survive parsing, a version over 1.5 or a
// missing $schema. Prints one JSON line per message ({"ok", "errors", "elements", "texts"});
// exits 1 when any message is not ok.
"use strict";

// The package's `lib` is extensionless ESM that Node cannot load; `dist` is its UMD build.
const AC = require("adaptivecards/dist/adaptivecards.js");

function texts(node, out) {
  if (Array.isArray(node)) node.forEach((n) => texts(n, out));
  else if (node && typeof node === "object") {
    for (const [k, v] of Object.entries(node)) {
      if (typeof v === "string" && ["text", "title", "value", "url"].includes(k)) out.push(v);
      else texts(v, out);
    }
  }
  return out;
}

function check(message) {
  const errors = [];
  if (message.type !== "message") errors.push(`type ${message.type}`);
  const attachments = Array.isArray(message.attachments) ? message.attachments : [];
  if (attachments.length !== 1) errors.push(`${attachments.length} attachments`);
  let elements = 0;
  let found = [];
  for (const a of attachments) {
    if (a.contentType !== "application/vnd.microsoft.card.adaptive") errors.push(`contentType ${a.contentType}`);
    if (a.contentUrl !== null) errors.push("contentUrl is not null");
    const json = a.content;
    if (json.$schema !== "http://adaptivecards.io/schemas/adaptive-card.json") errors.push(`$schema ${json.$schema}`);
    const context = new AC.SerializationContext(AC.Versions.v1_5);
    const card = new AC.AdaptiveCard();
    card.parse(json, context);
    for (let i = 0; i < context.eventCount; i++) {
      const e = context.getEventAt(i);
      errors.push(`parse: ${e.message}`);
    }
    for (const e of card.validateProperties().validationEvents) errors.push(`validation: ${e.message}`);
    const version = card.version;
    if (!version || version.major !== 1 || version.minor > 5) errors.push(`version ${version && version.toString()}`);
    const back = card.toJSON(new AC.SerializationContext(AC.Versions.v1_5));
    const body = Array.isArray(json.body) ? json.body.length : 0;
    const kept = Array.isArray(back.body) ? back.body.length : 0;
    if (kept !== body) errors.push(`${body - kept} of ${body} body elements did not survive parsing`);
    const actions = Array.isArray(json.actions) ? json.actions.length : 0;
    const keptActions = Array.isArray(back.actions) ? back.actions.length : 0;
    if (keptActions !== actions) errors.push(`${actions - keptActions} of ${actions} actions did not survive parsing`);
    elements += kept;
    found = texts(back, found);
  }
  return { ok: errors.length === 0, errors, elements, texts: found };
}

let input = "";
process.stdin.setEncoding("utf8");
process.stdin.on("data", (chunk) => (input += chunk));
process.stdin.on("end", () => {
  let failed = 0;
  for (const message of JSON.parse(input)) {
    const result = check(message);
    if (!result.ok) failed++;
    process.stdout.write(JSON.stringify(result) + "\n");
  }
  // exitCode, not exit(): exit() would cut output still being written to a pipe.
  process.exitCode = failed ? 1 : 0;
});
