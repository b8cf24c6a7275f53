// The live record stream: one EventSource per page on /stream/events (the filter is in
// its URL, checked by the server when the page was made). Each message is a record's
// `loupe tail` line; the list keeps the newest MAX_LINES.
"use strict";
(function () {
  const MAX_LINES = 1000;
  const list = document.getElementById("records");
  const status = document.getElementById("stream-status");
  if (!list || !list.dataset.events) {
    return;
  }
  const box = list.parentElement;
  let count = 0;
  const source = new EventSource(list.dataset.events);
  source.onopen = function () {
    status.textContent = "Connected: stored records first, then live ones as they arrive.";
  };
  source.onmessage = function (event) {
    const record = JSON.parse(event.data);
    const atEnd = box.scrollTop + box.clientHeight >= box.scrollHeight - 4;
    const item = document.createElement("li");
    item.className = "rec rec-" + record.kind;
    item.textContent = record.line;
    list.appendChild(item);
    while (list.childElementCount > MAX_LINES) {
      list.removeChild(list.firstElementChild);
    }
    count += 1;
    status.textContent = count + " records received.";
    if (atEnd) {
      box.scrollTop = box.scrollHeight;
    }
  };
  source.onerror = function () {
    status.textContent = "Disconnected from the collector; retrying…";
  };
})();
