// Live approvals inbox: prompts arrive, change and leave over /ws/approvals/ without a reload.
// Everything from the server is inserted with textContent, never as HTML.
//
// The stream is numbered (approvals/delivery.py): a snapshot sets the page to the database's state
// at sequence `seq`; each later message carries the next number. A jump means a message was lost
// on the way, so the page asks for a fresh snapshot; and since the newest message can be lost with
// nothing after it, every CHECK_MS the page tells the server the last number it applied and gets
// a snapshot back if the user's stream has moved past it.
(function () {
  "use strict";
  const list = document.getElementById("prompts");
  const empty = document.getElementById("empty");
  const template = document.getElementById("prompt-template");
  const badge = document.getElementById("pending-badge");
  const status = document.getElementById("live-status");
  const notifyButton = document.getElementById("enable-notifications");
  const CHECK_MS = 5000;
  const RESYNC_SPACING_MS = 1000; // at most one resync a second, however many gaps a burst shows
  let retry = 0;
  let socket = null;
  let lastSeq = null;            // the stream position the list reflects; null until a snapshot
  let awaitingSnapshot = false;
  let resyncTimer = null;
  let lastResyncAt = 0;

  function countdownText(expires) {
    const left = Math.max(0, Math.round((expires - Date.now()) / 1000));
    const m = Math.floor(left / 60), s = left % 60;
    return m + ":" + String(s).padStart(2, "0");
  }

  function refreshCounts() {
    const n = list.querySelectorAll("li.prompt").length;
    empty.hidden = n > 0;
    if (badge) {
      badge.textContent = String(n);
      badge.setAttribute("aria-label", n + " waiting");
      badge.classList.toggle("warn", n > 0);
    }
    document.title = (n > 0 ? "(" + n + ") " : "") + "Approvals · Countersign";
  }

  function fill(li, p) {
    li.dataset.id = p.id;
    li.dataset.expires = p.expires_at;
    li.querySelector(".agent").textContent = p.agent;
    li.querySelector(".scope").textContent = p.scope;
    li.querySelector(".headline").textContent = p.headline;
    li.querySelector(".details").textContent = JSON.stringify(p.authorization_details, null, 2);
    const note = li.querySelector(".agent-note");
    note.hidden = !p.binding_message;
    li.querySelector(".note").textContent = p.binding_message || "";
    li.querySelector(".gives").textContent = p.gives || "";
    const budget = li.querySelector(".budget-note");
    if (budget) {
      budget.hidden = !p.budget_note;
      budget.querySelector(".why").textContent = p.budget_note || "";
    }
    const t = li.querySelector(".countdown");
    t.setAttribute("datetime", p.expires_at);
    t.title = new Date(p.expires_at).toLocaleString();
    t.textContent = countdownText(Date.parse(p.expires_at));
    li.id = "prompt-" + p.id;
    // Two-person approval: for whom the agent asks, and how many approvals are still missing.
    const q = p.quorum || null;
    const forUser = li.querySelector(".for-user");
    forUser.hidden = !(q && q.for_user && !q.mine);
    li.querySelector(".requester").textContent = q ? q.for_user : "";
    li.querySelector(".quorum").hidden = !q;
    li.querySelector(".quorum-needed").textContent = q ? "Needs " + q.needed + " approval" + (q.needed === 1 ? "" : "s") : "";
    li.querySelector(".quorum-waiting").textContent = q ? (q.voted === "approve" ? "You approved. " : "") + q.waiting : "";
    li.querySelector(".actions").hidden = !!q && !q.can_vote;
    li.querySelector("form.approve").action = "/approvals/" + p.id + "/approve/";
    li.querySelector("form.deny").action = "/approvals/" + p.id + "/deny/";
  }

  function upsert(p, announce) {
    let li = list.querySelector('li.prompt[data-id="' + CSS.escape(p.id) + '"]');
    const isNew = !li || !li.querySelector(".agent");
    if (isNew) {
      const fresh = template.content.firstElementChild.cloneNode(true);
      if (li) { li.replaceWith(fresh); } else { list.appendChild(fresh); }
      li = fresh;
    }
    fill(li, p);
    refreshCounts();
    if (isNew && announce) { notify(p); }
  }

  function updateHistory(id, status, label) {
    // A request that already left the list can still change: an action token redeemed by its system.
    const badge = document.querySelector('#history tr[data-id="' + CSS.escape(id) + '"] .badge');
    if (badge && label) {
      badge.textContent = label;
      badge.className = "badge " + (status === "denied" || status === "cancelled" ? "bad"
        : status === "expired" ? "warn" : "ok");
    }
  }

  function remove(id, label, state) {
    updateHistory(id, state, label);
    const li = list.querySelector('li.prompt[data-id="' + CSS.escape(id) + '"]');
    if (li) {
      li.remove();
      if (label) { status.textContent = "A request was closed: " + label + "."; }
    }
    refreshCounts();
  }

  function notify(p) {
    if (!document.hidden || !("Notification" in window) || Notification.permission !== "granted") { return; }
    const n = new Notification(p.agent + " needs your approval", { body: p.headline, tag: p.id });
    n.onclick = function () { window.focus(); n.close(); };
  }

  function tick() {
    list.querySelectorAll("li.prompt").forEach(function (li) {
      const expires = Date.parse(li.dataset.expires);
      const t = li.querySelector(".countdown");
      if (t && !isNaN(expires)) { t.textContent = countdownText(expires); }
      if (!isNaN(expires) && expires <= Date.now()) { remove(li.dataset.id, "expired"); }
    });
  }

  function send(message) {
    if (socket && socket.readyState === WebSocket.OPEN) { socket.send(JSON.stringify(message)); }
  }

  function requestResync() {
    if (awaitingSnapshot || resyncTimer !== null) { return; }
    const wait = Math.max(0, lastResyncAt + RESYNC_SPACING_MS - Date.now());
    resyncTimer = setTimeout(function () {
      resyncTimer = null;
      lastResyncAt = Date.now();
      awaitingSnapshot = true;
      send({ type: "resync" });
    }, wait);
  }

  function check() {
    if (lastSeq !== null && !awaitingSnapshot) { send({ type: "check", seq: lastSeq }); }
  }

  function applySnapshot(msg) {
    const keep = new Set(msg.prompts.map(function (p) { return p.id; }));
    list.querySelectorAll("li.prompt").forEach(function (li) {
      if (!keep.has(li.dataset.id)) { li.remove(); }
    });
    msg.prompts.forEach(function (p) { upsert(p, false); });
    refreshCounts();
    lastSeq = msg.seq;
    awaitingSnapshot = false;
  }

  function onMessage(msg) {
    if (msg.type === "snapshot") { applySnapshot(msg); return; }
    if (typeof msg.seq !== "number" || lastSeq === null || msg.seq <= lastSeq) {
      return; // already covered by the snapshot the list reflects
    }
    const gap = msg.seq !== lastSeq + 1;
    lastSeq = msg.seq;
    if (msg.type === "upsert") {
      upsert(msg.prompt, true);
    } else if (msg.type === "remove") {
      remove(msg.id, msg.label, msg.status);
    }
    if (gap) { requestResync(); }
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/approvals/");
    socket = ws;
    ws.onopen = function () { retry = 0; status.textContent = "Live: new requests appear here as they come in."; };
    ws.onmessage = function (event) { onMessage(JSON.parse(event.data)); };
    ws.onclose = function () {
      // A new connection starts from its own snapshot.
      socket = null;
      lastSeq = null;
      awaitingSnapshot = false;
      if (resyncTimer !== null) { clearTimeout(resyncTimer); resyncTimer = null; }
      status.textContent = "Reconnecting… (decisions still work; reload to refresh)";
      retry = Math.min(retry + 1, 6);
      setTimeout(connect, 250 * Math.pow(2, retry));
    };
  }

  if (notifyButton && "Notification" in window && Notification.permission === "default") {
    notifyButton.hidden = false;
    notifyButton.addEventListener("click", function () {
      Notification.requestPermission().then(function () { notifyButton.hidden = true; });
    });
  }
  setInterval(tick, 1000);
  setInterval(check, CHECK_MS);
  connect();
})();
