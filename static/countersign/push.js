// "Notify me on this device": registers the inbox's service worker and, on the button, subscribes
// this browser to Web Push (RFC 8030) with the server's VAPID key (RFC 8292) and sends the
// subscription to /approvals/devices/subscribe/. Without JavaScript or Push the button stays hidden;
// the inbox and its forms work as they are.
"use strict";
(function () {
  if (!("serviceWorker" in navigator)) return;
  navigator.serviceWorker.register("/approvals/sw.js", { scope: "/approvals/" }).catch(() => {});
  const button = document.getElementById("push-subscribe");
  const status = document.getElementById("push-status");
  if (!button || !button.dataset.vapidKey || !("PushManager" in window) || !("Notification" in window)) return;
  button.hidden = false;

  function say(text) {
    if (status) status.textContent = text;
  }

  function keyBytes(b64url) {
    const b64 = (b64url + "=".repeat((4 - (b64url.length % 4)) % 4)).replace(/-/g, "+").replace(/_/g, "/");
    return Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  }

  function csrfToken() {
    const input = document.querySelector("input[name=csrfmiddlewaretoken]");
    return input ? input.value : "";
  }

  button.addEventListener("click", async () => {
    button.disabled = true;
    try {
      if ((await Notification.requestPermission()) !== "granted") {
        say("Notifications are blocked for this site in your browser's settings.");
        return;
      }
      const registration = await navigator.serviceWorker.ready;
      let subscription = await registration.pushManager.getSubscription();
      if (!subscription) {
        subscription = await registration.pushManager.subscribe({
          userVisibleOnly: true, applicationServerKey: keyBytes(button.dataset.vapidKey) });
      }
      const response = await fetch("/approvals/devices/subscribe/", {
        method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json", "X-CSRFToken": csrfToken(),
                   "X-Device-Label": (navigator.userAgentData && navigator.userAgentData.platform) || navigator.platform || "" },
        body: JSON.stringify(subscription.toJSON()),
      });
      if (response.ok) {
        say("This device will be notified of new requests.");
      } else {
        const body = await response.json().catch(() => ({}));
        say("This device could not be added: " + (body.error_description || response.status));
      }
    } catch (e) {
      say("This browser could not subscribe to notifications.");
    } finally {
      button.disabled = false;
    }
  });
})();
