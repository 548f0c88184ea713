// Live approvals inbox: prompts arrive, change and leave over /ws/approvals/ without a reload.
// Everything from the server is inserted with textContent, never as HTML.
(function () {
  "use strict";
  const list = document.getElementById("prompts");
  const empty = document.getElementById("empty");
  const template = document.getElementById("prompt-template");
  const badge = document.getElementById("pending-badge");
  const status = document.getElementById("live-status");
  const notifyButton = document.getElementById("enable-notifications");
  let retry = 0;

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
    const t = li.querySelector(".countdown");
    t.setAttribute("datetime", p.expires_at);
    t.title = new Date(p.expires_at).toLocaleString();
    t.textContent = countdownText(Date.parse(p.expires_at));
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

  function remove(id, label) {
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

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/approvals/");
    ws.onopen = function () { retry = 0; status.textContent = "Live: new requests appear here as they come in."; };
    ws.onmessage = function (event) {
      const msg = JSON.parse(event.data);
      if (msg.type === "snapshot") {
        const keep = new Set(msg.prompts.map(function (p) { return p.id; }));
        list.querySelectorAll("li.prompt").forEach(function (li) {
          if (!keep.has(li.dataset.id)) { li.remove(); }
        });
        msg.prompts.forEach(function (p) { upsert(p, false); });
        refreshCounts();
      } else if (msg.type === "upsert") {
        upsert(msg.prompt, true);
      } else if (msg.type === "remove") {
        remove(msg.id, msg.label);
      }
    };
    ws.onclose = function () {
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
  connect();
})();
