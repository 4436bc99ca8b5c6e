// Dashboard: replace the series table with a fresh server-rendered one every few seconds.
(function () {
  "use strict";
  const box = document.getElementById("series");
  if (!box) { return; }
  const every = Number(box.dataset.every || 3) * 1000;
  async function tick() {
    if (!document.hidden) {
      try {
        const response = await fetch(box.dataset.refresh, { credentials: "same-origin" });
        if (response.ok) {
          box.innerHTML = await response.text();
          document.getElementById("updated").textContent = new Date().toLocaleTimeString();
        }
      } catch (err) {
        // the node is restarting or unreachable: try again at the next tick
      }
    }
    setTimeout(tick, every);
  }
  setTimeout(tick, every);
})();
