/* cage_lens interactive graph viewer (no dependencies, no network).
 *
 * It enhances the static SVG that cage_lens renders into the same page, so a page whose scripts do not
 * run (some notebook front ends sanitise outputs) still shows the whole graph with native tooltips.
 * Elements: nodes carry data-i (index into data.nodes), edges data-e (index into data.edges).
 *   hover a node   -> tooltip: label, token, relevance, strongest visible inputs and outputs
 *   click a node   -> highlight every path from it to the target node(s); click the background to clear
 *   slider         -> hide edges with |value| below a fraction of the largest |value|
 * All text from the data goes in through textContent, never as markup.
 */
(function () {
  "use strict";
  if (window.cageLensViewer) return;

  function signed(v) {
    var s = Number(v).toPrecision(4);
    return v >= 0 ? "+" + s : s;
  }

  function line(parent, text, cls) {
    var div = document.createElement("div");
    if (cls) div.className = cls;
    div.textContent = text;
    parent.appendChild(div);
    return div;
  }

  function graph(root, data) {
    var svg = root.querySelector("svg.cl-graph");
    var tip = root.querySelector(".cl-tip");
    var slider = root.querySelector(".cl-slider");
    var count = root.querySelector(".cl-count");
    var canvas = root.querySelector(".cl-canvas");
    var nodeEls = [], edgeEls = [], incoming = [], outgoing = [], visible = [];
    var selected = null, i;

    Array.prototype.forEach.call(svg.querySelectorAll("[data-i]"), function (el) {
      nodeEls[+el.getAttribute("data-i")] = el;
    });
    Array.prototype.forEach.call(svg.querySelectorAll("[data-e]"), function (el) {
      edgeEls[+el.getAttribute("data-e")] = el;
    });
    // the script shows its own tooltips: drop the static ones so the two do not overlap
    Array.prototype.forEach.call(svg.querySelectorAll("[data-i] > title"), function (t) { t.remove(); });
    for (i = 0; i < data.nodes.length; i++) { incoming.push([]); outgoing.push([]); }
    data.edges.forEach(function (e, k) {
      outgoing[e[0]].push(k);
      incoming[e[1]].push(k);
      visible.push(true);
    });

    function strongest(list, end) {
      return list.filter(function (k) { return visible[k]; })
        .sort(function (a, b) { return Math.abs(data.edges[b][2]) - Math.abs(data.edges[a][2]); })
        .slice(0, 3)
        .map(function (k) { return "  " + data.nodes[data.edges[k][end]].label + "  " + signed(data.edges[k][2]); });
    }

    function showTip(index, el) {
      var d = data.nodes[index];
      tip.textContent = "";
      line(tip, d.label, "cl-tip-title");
      line(tip, "token " + JSON.stringify(d.token));
      line(tip, (d.what || data.valueName) + " " + signed(d.value));
      var ins = strongest(incoming[index], 0), outs = strongest(outgoing[index], 1);
      if (ins.length) { line(tip, "strongest inputs:"); ins.forEach(function (t) { line(tip, t); }); }
      if (outs.length) { line(tip, "strongest outputs:"); outs.forEach(function (t) { line(tip, t); }); }
      var box = el.getBoundingClientRect(), frame = canvas.getBoundingClientRect();
      tip.style.left = (box.right - frame.left + canvas.scrollLeft + 8) + "px";
      tip.style.top = (box.top - frame.top + canvas.scrollTop) + "px";
      tip.style.display = "block";
    }

    function reach(start, lists, end) {
      var seen = {}, stack = start.slice();
      start.forEach(function (s) { seen[s] = true; });
      while (stack.length) {
        var n = stack.pop();
        lists[n].forEach(function (k) {
          if (!visible[k]) return;
          var m = data.edges[k][end];
          if (!seen[m]) { seen[m] = true; stack.push(m); }
        });
      }
      return seen;
    }

    function highlight(index) {
      var below = reach([index], outgoing, 1), above = reach(data.targets, incoming, 0);
      root.classList.add("cl-focus");
      nodeEls.forEach(function (el, n) { el.classList.toggle("cl-on", !!(below[n] && above[n])); });
      edgeEls.forEach(function (el, k) {
        var e = data.edges[k];
        el.classList.toggle("cl-on", visible[k] && !!(below[e[0]] && above[e[0]] && below[e[1]] && above[e[1]]));
      });
    }

    function clearHighlight() {
      root.classList.remove("cl-focus");
      root.querySelectorAll(".cl-on").forEach(function (el) { el.classList.remove("cl-on"); });
    }

    function applyThreshold() {
      var cut = (+slider.value / +slider.max) * data.maxEdge, shown = 0;
      data.edges.forEach(function (e, k) {
        visible[k] = Math.abs(e[2]) >= cut;
        edgeEls[k].style.display = visible[k] ? "" : "none";
        if (visible[k]) shown++;
      });
      count.textContent = shown + " of " + data.edges.length + " edges shown (|value| \u2265 " + cut.toPrecision(3) + ")";
      root.setAttribute("data-visible-edges", String(shown));
      if (selected !== null) highlight(selected);
    }

    svg.addEventListener("mouseover", function (evt) {
      var el = evt.target.closest("[data-i]");
      if (el) showTip(+el.getAttribute("data-i"), el);
    });
    svg.addEventListener("mouseout", function (evt) {
      if (evt.target.closest("[data-i]")) tip.style.display = "none";
    });
    svg.addEventListener("click", function (evt) {
      var el = evt.target.closest("[data-i]");
      if (el) { selected = +el.getAttribute("data-i"); highlight(selected); }
      else { selected = null; clearHighlight(); }
    });
    slider.addEventListener("input", applyThreshold);
    applyThreshold();
    root.classList.add("cl-live");
  }

  window.cageLensViewer = { graph: graph };
})();
