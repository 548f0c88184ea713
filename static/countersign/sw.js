// The inbox's service worker (scope /approvals/): shows a pushed prompt as a notification and opens
// the prompt when it is clicked. The pushed message (RFC 8291, decrypted by the browser) carries the
// server-written headline and the prompt's path, never anything that could approve it.
"use strict";

self.addEventListener("install", () => self.skipWaiting());
self.addEventListener("activate", (event) => event.waitUntil(self.clients.claim()));

// Only our own inbox's paths are opened, whatever a message says.
function promptPath(data) {
  return data && typeof data.url === "string" && data.url.startsWith("/approvals/") ? data.url : "/approvals/";
}
function promptUrl(data) {
  return new URL(promptPath(data), self.location.origin).href;
}
self.promptUrl = promptUrl;

self.addEventListener("push", (event) => {
  let data = {};
  try {
    data = event.data ? event.data.json() : {};
  } catch (e) {
    data = {};
  }
  const title = typeof data.title === "string" ? data.title : "An agent asks for your approval";
  const options = {
    body: typeof data.body === "string" ? data.body : "Open your approvals to see what it asks.",
    tag: typeof data.id === "string" ? "approval-" + data.id : "approval",
    data: { url: promptPath(data), id: typeof data.id === "string" ? data.id : "" },
    icon: "/static/countersign/icons/icon-192.png",
    requireInteraction: true,
  };
  event.waitUntil(self.registration.showNotification(title, options));
});

self.addEventListener("notificationclick", (event) => {
  event.notification.close();
  const url = promptUrl(event.notification.data);
  event.waitUntil((async () => {
    // An inbox this worker controls is reused (focused, then taken to the prompt); else a new window.
    const windows = await self.clients.matchAll({ type: "window" });
    for (const client of windows) {
      if (new URL(client.url).pathname.startsWith("/approvals/")) {
        try {
          await client.focus();
          const navigated = await client.navigate(url);
          if (navigated) return navigated;
        } catch (e) {
          // not focusable or not navigable from here: open a window instead
        }
      }
    }
    return self.clients.openWindow(url);
  })());
});
