// Live updates without a reload: every data-refresh seconds (at most 5), fetch this
// page's live part (header X-Molteniron-Live: 1) and put it in place of #live.
// Without scripts the page is whole as served; reloading it updates it.
(function () {
  "use strict";
  var live = document.getElementById("live");
  var state = document.getElementById("live-state");
  if (!live || !window.fetch) { return; }
  var seconds = Math.min(5, Math.max(0.5, parseFloat(live.getAttribute("data-refresh")) || 5));
  if (state) { state.textContent = "Updates every " + seconds + " s."; }
  function tick() {
    fetch(window.location.pathname + window.location.search, {
      headers: {"X-Molteniron-Live": "1"}, cache: "no-store", credentials: "same-origin"
    }).then(function (response) {
      // 503: the worker did not answer; the part says so, and is shown.
      if (!response.ok && response.status !== 503) { throw new Error("HTTP " + response.status); }
      return response.text();
    }).then(function (html) {
      live.innerHTML = html;
      live.classList.remove("stale");
      if (state) { state.textContent = "Updates every " + seconds + " s."; }
    }).catch(function (error) {
      live.classList.add("stale");
      if (state) { state.textContent = "Not updated: " + error.message + "; retrying."; }
    }).then(function () {
      window.setTimeout(tick, seconds * 1000);
    });
  }
  window.setTimeout(tick, seconds * 1000);
}());
