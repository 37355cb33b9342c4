// clado-supervisor console: the only script, loaded from /ui/static (the CSP allows no other).
// 1. A <main data-refresh="N"> re-reads its page every N seconds and swaps its content in place.
// 2. A button with data-confirm asks before its form is posted.
"use strict";

(function () {
  function refresh(main, seconds) {
    window.setTimeout(function tick() {
      fetch(window.location.href, { credentials: "same-origin", redirect: "follow" })
        .then(function (response) {
          if (!response.ok || response.redirected) {
            window.location.reload(); // logged out, or an error page: show it as a page
            return null;
          }
          return response.text();
        })
        .then(function (html) {
          if (html === null) return;
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("main");
          if (fresh) main.innerHTML = fresh.innerHTML;
          main.dataset.refreshed = String(Date.now());
          window.setTimeout(tick, seconds * 1000);
        })
        .catch(function () {
          window.setTimeout(tick, seconds * 1000); // the daemon restarting: try again later
        });
    }, seconds * 1000);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var main = document.getElementById("main");
    var seconds = main && Number(main.dataset.refresh);
    if (seconds > 0) refresh(main, seconds);
    document.addEventListener("click", function (event) {
      var button = event.target.closest("button[data-confirm]");
      if (button && !window.confirm(button.dataset.confirm)) event.preventDefault();
    });
  });
})();
