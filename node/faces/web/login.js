// The sign-in form: POST /login {"token": ...} as JSON. The server sets an HttpOnly,
// SameSite=Strict cookie this script never sees, then the UI loads with it.
"use strict";

document.getElementById("signin").addEventListener("submit", async (event) => {
  event.preventDefault();
  const banner = document.getElementById("banner");
  const button = document.getElementById("signin-submit");
  button.disabled = true;
  try {
    const response = await fetch("/login", {
      method: "POST",
      credentials: "same-origin",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ token: document.getElementById("token").value }),
    });
    if (response.ok) {
      window.location.assign("/");
      return;
    }
    let message = `${response.status} ${response.statusText}`;
    try { message = (await response.json()).error || message; } catch (_) { /* keep it */ }
    banner.textContent = `Sign-in failed: ${message}`;
    banner.hidden = false;
  } catch (error) {
    banner.textContent = `Sign-in failed: ${error.message}`;
    banner.hidden = false;
  }
  button.disabled = false;
});
