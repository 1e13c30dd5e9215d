// Ferry portal: live refresh of [data-live] parts, copy buttons, tenant switch on change.
// Pages work without this file; it only saves reloading. No inline script anywhere (CSP).
"use strict";
(function () {
  function refresh(el) {
    var busy = false;
    var interval = parseInt(el.getAttribute("data-interval"), 10) || 3000;
    setInterval(function () {
      if (busy || document.hidden || el.contains(document.activeElement)) return;
      busy = true;
      fetch(el.getAttribute("data-live"), {credentials: "same-origin", headers: {"Accept": "text/html"}})
        .then(function (r) { if (r.ok) return r.text(); throw new Error(r.status); })
        .then(function (html) { el.innerHTML = html; el.setAttribute("data-updated", Date.now()); })
        .catch(function () { el.setAttribute("data-stale", "1"); })
        .then(function () { busy = false; });
    }, interval);
  }
  function copy(button) {
    var source = document.getElementById(button.getAttribute("data-copy"));
    if (!source || !navigator.clipboard) return;
    navigator.clipboard.writeText(source.textContent.trim()).then(function () {
      button.textContent = "Copied";
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    });
  }
  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("[data-live]").forEach(refresh);
    document.addEventListener("click", function (e) {
      var b = e.target.closest("[data-copy]");
      if (b) copy(b);
    });
    document.querySelectorAll("select[data-autosubmit]").forEach(function (s) {
      s.addEventListener("change", function () { s.form.submit(); });
    });
  });
})();
