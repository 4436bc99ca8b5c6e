// Classify: say that work is going on while the node analyses the upload.
(function () {
  "use strict";
  const form = document.getElementById("upload");
  if (!form) { return; }
  form.addEventListener("submit", function () {
    const button = form.querySelector("button");
    button.disabled = true;
    button.textContent = "Classifying…";
  });
})();
