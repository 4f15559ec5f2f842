// The live page: frames over a WebSocket drawn on a canvas, the prompt box and buttons over fetch.
"use strict";
const params = new URLSearchParams(location.search);
const token = params.get("token");
const headers = token ? { "Authorization": "Bearer " + token, "Content-Type": "application/json" }
                      : { "Content-Type": "application/json" };
const $ = (id) => document.getElementById(id);
const canvas = $("video"), ctx = canvas.getContext("2d");
ctx.imageSmoothingEnabled = false;

// What tests and the latency benchmark read: frames drawn, and per typed prompt the time from
// submitting it to drawing the first frame generated under it.
const live = window.slotgenLive = { framesDrawn: 0, lastFrame: -1, state: null, pending: [], latencies: [] };
const drawnAt = new Map();  // frame index -> performance.now() when drawn (the last 512 frames)

function tookEffect(p, index, now) {  // the first frame under a typed prompt was drawn
  p.drawn = now; live.latencies.push({ text: p.text, frame: p.frame, ms: now - p.sent });
}

async function post(path, body) {
  const r = await fetch(path + (token ? "?token=" + encodeURIComponent(token) : ""),
                        { method: "POST", headers, body: JSON.stringify(body || {}) });
  const data = await r.json().catch(() => ({ error: "HTTP " + r.status }));
  $("message").textContent = data.error ? "error: " + data.error : (data.warnings || []).join("; ");
  return data;
}

function fmt(t) { return t.toFixed(3).replace(/\.?0+$/, "") + "s"; }

function showState(s) {
  live.state = s;
  $("status").textContent = s.status;
  $("clock").textContent = `chunk ${s.chunk} · ${s.frames} frames · ${fmt(s.seconds)}`;
  $("current").textContent = s.current || "-";
  $("next").textContent = s.next ? s.next.text + (s.next.transition ? ` (${s.next.transition}s ${s.next.blend})` : "")
                                 : "(same)";
  const tl = $("timeline");
  tl.replaceChildren(...s.timeline.map((e) => {
    const li = document.createElement("li");
    const t = document.createElement("span"); t.className = "t"; t.textContent = fmt(e.start) + " ";
    li.append(t, document.createTextNode(e.text));
    if (e.transition) { const x = document.createElement("span"); x.className = "tr";
      x.textContent = ` ← ${e.transition}s ${e.blend}`; li.append(x); }
    return li;
  }));
  for (const p of live.pending) {  // a typed prompt took effect: at which frame?
    const e = s.timeline.find((e) => e.source === "typed" && e.text === p.text && e.frame >= p.after);
    if (e && p.frame === undefined) {
      p.frame = e.frame;  // its frames may be drawn already: the state can arrive after them
      const first = [...drawnAt.keys()].filter((i) => i >= p.frame).sort((a, b) => a - b)[0];
      if (first !== undefined) tookEffect(p, first, drawnAt.get(first));
    }
  }
  const m = s.memory;
  if (m) {
    $("memsum").textContent = `${m.policy}, ${m.frames_seen} latent frames seen, ${(m.bytes / 1048576).toFixed(2)} MiB`;
    const head = document.createElement("tr");
    head.append(...m.columns.map((c) => { const th = document.createElement("th"); th.textContent = c; return th; }));
    $("memory").tHead.replaceChildren(head);
    const maxTok = Math.max(1, ...m.rows.map((r) => +r[1]));
    $("memory").tBodies[0].replaceChildren(...m.rows.map((r) => {
      const tr = document.createElement("tr");
      r.forEach((cell, i) => {
        const td = document.createElement("td"); td.textContent = cell;
        if (i === 1) { const b = document.createElement("span"); b.className = "bar";
          b.style.width = (60 * (+cell) / maxTok) + "px"; td.prepend(b, " "); }
        tr.append(td);
      });
      return tr;
    }));
  }
  $("snapshots").replaceChildren(...s.snapshots.map((n) => { const li = document.createElement("li");
    li.textContent = "snapshot: " + n; return li; }));
  if (s.error) $("message").textContent = "error: " + s.error;
  if (s.status === "stopped") $("message").textContent = "stopped: the video, story.yaml and snapshot.pt are written";
}

let drawing = Promise.resolve();
function drawFrame(buf) {
  const view = new DataView(buf);
  const index = view.getUint32(0, true);
  const blob = new Blob([new Uint8Array(buf, 8)], { type: "image/png" });
  drawing = drawing.then(() => createImageBitmap(blob)).then((bmp) => {
    ctx.drawImage(bmp, 0, 0, canvas.width, canvas.height);
    bmp.close();
    const now = performance.now();
    live.framesDrawn += 1; live.lastFrame = index;
    drawnAt.set(index, now);
    if (drawnAt.size > 512) drawnAt.delete(drawnAt.keys().next().value);
    for (const p of live.pending) {
      if (p.frame !== undefined && p.drawn === undefined && index >= p.frame) tookEffect(p, index, now);
    }
  }).catch(() => {});
}

function connect() {
  const proto = location.protocol === "https:" ? "wss:" : "ws:";
  const ws = new WebSocket(`${proto}//${location.host}/ws` + (token ? "?token=" + encodeURIComponent(token) : ""));
  ws.binaryType = "arraybuffer";
  ws.onmessage = (ev) => {
    if (typeof ev.data === "string") showState(JSON.parse(ev.data)); else drawFrame(ev.data);
  };
  ws.onclose = () => {
    if (live.state && ["stopped", "failed"].includes(live.state.status)) return;
    $("status").textContent = "disconnected"; setTimeout(connect, 1000);
  };
}

$("direct").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const text = $("prompt").value;
  const after = live.state ? live.state.frames : 0;
  const entry = { text: text.trim(), sent: performance.now(), after };
  live.pending.push(entry);  // before the answer: the state saying where it took effect may come first
  const r = await post("api/prompt", { text, transition: parseFloat($("transition").value) || 0,
                                       blend: $("blend").value });
  if (r.error) live.pending.splice(live.pending.indexOf(entry), 1); else $("prompt").value = "";
});
$("pause").onclick = () => post("api/pause");
$("resume").onclick = () => post("api/resume");
$("stop").onclick = () => post("api/stop");
$("snapshot").onclick = async () => { const r = await post("api/snapshot");
  if (r.snapshot) $("message").textContent = "snapshot written: " + r.snapshot; };
connect();
