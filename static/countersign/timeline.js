// The story of one connection, kept current: the inbox websocket (/ws/approvals/) says when
// something changed for this user (a prompt, a decision, a redemption, a reported use, the end of
// a grant), and the list is re-read from the server. Tokens minted on the hot path send no news,
// so the list is also re-read every REFRESH_MS while the page is open.
(function () {
  "use strict";
  const card = document.getElementById("timeline-card");
  const status = document.getElementById("timeline-status");
  if (!card) { return; }
  const url = location.pathname + "?part=timeline";
  const REFRESH_MS = 10000;
  const SPACING_MS = 1000; // a burst of news (a busy run) costs one re-read a second, not one each
  let pending = null;
  let queued = null;
  let lastAt = 0;
  let retry = 0;

  let leaving = false;
  document.addEventListener("submit", function () { leaving = true; });

  function soon() {
    if (queued !== null) { return; }
    queued = setTimeout(function () { queued = null; reload(); },
                        Math.max(0, lastAt + SPACING_MS - Date.now()));
  }

  function reload() {
    if (leaving) { return; }
    if (pending) { soon(); return; }
    lastAt = Date.now();
    pending = fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (html) {
        const doc = new DOMParser().parseFromString(html, "text/html");
        const fresh = doc.getElementById("timeline");
        const old = document.getElementById("timeline");
        if (fresh && old) { old.replaceWith(document.importNode(fresh, true)); }
        if (window.countersignLocalTime) { window.countersignLocalTime(); }
      })
      .catch(function () { /* the next change or tick tries again */ })
      .finally(function () { pending = null; });
  }

  function connect() {
    const scheme = location.protocol === "https:" ? "wss://" : "ws://";
    const ws = new WebSocket(scheme + location.host + "/ws/approvals/");
    ws.onopen = function () { retry = 0; if (card.dataset.live === "1") { status.textContent = "Live: this list updates by itself."; } };
    ws.onmessage = function (event) {
      let msg = null;
      try { msg = JSON.parse(event.data); } catch (e) { return; }
      // Another grant's news is not this page's; a snapshot is the inbox's own state on connect.
      if (msg.type === "snapshot" || (msg.type === "grant" && msg.grant_id !== card.dataset.grant)) { return; }
      soon();
    };
    ws.onclose = function () {
      retry = Math.min(retry + 1, 6);
      setTimeout(connect, 250 * Math.pow(2, retry));
    };
  }
  connect();
  setInterval(reload, REFRESH_MS);
})();
