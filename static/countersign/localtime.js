// Times in the reader's own time zone: tell the server (a "tz" cookie, used on the next page) and
// rewrite each <time data-local> now, with its "(4 min ago)" hint kept current.
(function () {
  "use strict";
  let zone = "";
  try { zone = Intl.DateTimeFormat().resolvedOptions().timeZone || ""; } catch (e) { zone = ""; }
  if (zone && document.cookie.indexOf("tz=" + zone) === -1) {
    document.cookie = "tz=" + encodeURIComponent(zone) + "; path=/; max-age=31536000; SameSite=Lax";
  }
  const format = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short", year: "numeric",
                                                      hour: "2-digit", minute: "2-digit" });
  function relative(t) {
    let s = Math.round((Date.now() - t) / 1000);
    const future = s < 0; s = Math.abs(s);
    if (s < 60) { return future ? "in a moment" : "just now"; }
    const units = [[86400, "day"], [3600, "h"], [60, "min"]];
    for (let i = 0; i < units.length; i++) {
      if (s >= units[i][0]) {
        const n = Math.floor(s / units[i][0]);
        const text = n + " " + units[i][1] + (units[i][1] === "day" && n !== 1 ? "s" : "");
        return future ? "in " + text : text + " ago";
      }
    }
    return "";
  }
  function render() {
    document.querySelectorAll("time[data-local]").forEach(function (el) {
      const t = Date.parse(el.getAttribute("datetime"));
      if (isNaN(t)) { return; }
      el.textContent = format.format(new Date(t));
      el.title = new Date(t).toISOString();
      const hint = el.nextElementSibling;
      if (hint && hint.classList.contains("ago")) { hint.textContent = "(" + relative(t) + ")"; }
    });
  }
  render();
  setInterval(render, 30000);
  window.countersignLocalTime = render;
})();
