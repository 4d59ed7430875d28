/* cage_lens interactive graph viewer (no dependencies, no network).
 *
 * It enhances the static SVG that cage_lens renders into the same page, so a page whose scripts do not
 * run (some notebook front ends sanitise outputs) still shows the whole graph with native tooltips.
 * Elements: nodes carry data-i (index into data.nodes), edges data-e (index into data.edges); elements
 * of a "show more" tier carry data-tier (absent: tier 0, the graph as built).
 *   fit            -> the SVG's viewBox scales the whole graph into the space left in the window
 *   zoom / pan     -> +/- buttons or ctrl + wheel zoom around the pointer, drag pans, "fit" resets
 *   hover a node   -> tooltip (kept inside the window): label, token, value, strongest visible edges
 *   click a node   -> highlight every path from it to the target node(s); click the background to clear
 *   slider         -> hide edges with |value| below a fraction of the largest |value|
 *   show (select)  -> draw the graph pruned less (tiers)
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
    var tierSelect = root.querySelector(".cl-tier");
    var nodeEls = [], edgeEls = [], incoming = [], outgoing = [], visible = [], nodeShown = [];
    var selected = null, tier = 0, i;
    var full = svg.getAttribute("viewBox").split(" ").map(Number);
    var view = full.slice();

    Array.prototype.forEach.call(svg.querySelectorAll("[data-i]"), function (el) {
      nodeEls[+el.getAttribute("data-i")] = el;
    });
    Array.prototype.forEach.call(svg.querySelectorAll("[data-e]"), function (el) {
      edgeEls[+el.getAttribute("data-e")] = el;
    });
    // the script shows its own tooltips: drop the static ones so the two do not overlap
    Array.prototype.forEach.call(svg.querySelectorAll("[data-i] > title"), function (t) { t.remove(); });
    for (i = 0; i < data.nodes.length; i++) { incoming.push([]); outgoing.push([]); nodeShown.push(true); }
    data.edges.forEach(function (e, k) {
      outgoing[e[0]].push(k);
      incoming[e[1]].push(k);
      visible.push(true);
    });

    // ------------------------------------------------------------------ fit, zoom, pan
    function setView(v) {
      view = v;
      svg.setAttribute("viewBox", v.map(function (x) { return x.toFixed(1); }).join(" "));
    }

    function fitHeight() {
      // the graph gets the height left in the window below its own top (a page), or the whole window
      var top = svg.getBoundingClientRect().top + window.scrollY;
      var room = window.innerHeight - top - 12;
      svg.style.maxHeight = (room >= 300 ? room : window.innerHeight - 24) + "px";
    }

    function fit() { fitHeight(); setView(full.slice()); }

    function scale() {  // viewBox units per screen pixel (preserveAspectRatio "meet")
      var box = svg.getBoundingClientRect();
      return Math.max(view[2] / box.width, view[3] / box.height);
    }

    function zoom(factor, clientX, clientY) {
      var box = svg.getBoundingClientRect(), s = scale();
      var cx = clientX === undefined ? view[0] + view[2] / 2 : view[0] + (clientX - box.left) * s;
      var cy = clientY === undefined ? view[1] + view[3] / 2 : view[1] + (clientY - box.top) * s;
      var w = Math.min(full[2] * 4, Math.max(full[2] / 40, view[2] / factor));
      var h = w * view[3] / view[2];
      setView([cx - (cx - view[0]) * w / view[2], cy - (cy - view[1]) * h / view[3], w, h]);
    }

    root.querySelector(".cl-zoom-in").addEventListener("click", function () { zoom(1.5); });
    root.querySelector(".cl-zoom-out").addEventListener("click", function () { zoom(1 / 1.5); });
    root.querySelector(".cl-fit").addEventListener("click", fit);
    svg.addEventListener("wheel", function (evt) {
      if (!(evt.ctrlKey || evt.metaKey)) return;  // plain wheel scrolls the page
      evt.preventDefault();
      zoom(evt.deltaY < 0 ? 1.25 : 1 / 1.25, evt.clientX, evt.clientY);
    }, { passive: false });

    var drag = null, dragged = false;
    svg.addEventListener("pointerdown", function (evt) {
      drag = { x: evt.clientX, y: evt.clientY, view: view.slice(), s: scale() };
      dragged = false;
    });
    window.addEventListener("pointermove", function (evt) {
      if (!drag) return;
      var dx = evt.clientX - drag.x, dy = evt.clientY - drag.y;
      if (!dragged && Math.abs(dx) + Math.abs(dy) < 4) return;
      dragged = true;
      tip.style.display = "none";
      setView([drag.view[0] - dx * drag.s, drag.view[1] - dy * drag.s, drag.view[2], drag.view[3]]);
    });
    window.addEventListener("pointerup", function () { drag = null; });
    window.addEventListener("resize", fitHeight);

    // ------------------------------------------------------------------ tooltip
    function strongest(list, end) {
      return list.filter(function (k) { return visible[k]; })
        .sort(function (a, b) { return Math.abs(data.edges[b][2]) - Math.abs(data.edges[a][2]); })
        .slice(0, 3)
        .map(function (k) { return "  " + data.nodes[data.edges[k][end]].label + "  " + signed(data.edges[k][2]); });
    }

    function place(box) {
      // beside the node, flipped to its left near the right edge, always inside the window
      var w = tip.offsetWidth, h = tip.offsetHeight, pad = 4;
      var left = box.right + 8;
      if (left + w > window.innerWidth - pad) left = box.left - 8 - w;
      left = Math.max(pad, Math.min(left, window.innerWidth - w - pad));
      var top = Math.max(pad, Math.min(box.top, window.innerHeight - h - pad));
      tip.style.left = left + "px";
      tip.style.top = top + "px";
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
      tip.style.display = "block";
      place(el.getBoundingClientRect());
    }

    // ------------------------------------------------------------------ paths
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

    // ------------------------------------------------------------------ what is drawn
    function apply() {
      var cut = (+slider.value / +slider.max) * data.maxEdge, shown = 0, inTier = 0;
      data.nodes.forEach(function (d, n) {
        nodeShown[n] = (d.tier || 0) <= tier;
        nodeEls[n].style.display = nodeShown[n] ? "inline" : "none";
      });
      data.edges.forEach(function (e, k) {
        var here = (e[3] || 0) <= tier;
        if (here) inTier++;
        visible[k] = here && Math.abs(e[2]) >= cut;
        edgeEls[k].style.display = visible[k] ? "inline" : "none";
        if (visible[k]) shown++;
      });
      count.textContent = shown + " of " + inTier + " edges shown (|value| \u2265 " + cut.toPrecision(3) + ")";
      root.setAttribute("data-visible-edges", String(shown));
      if (selected !== null && nodeShown[selected]) highlight(selected);
      else if (selected !== null) { selected = null; clearHighlight(); }
    }

    svg.addEventListener("mouseover", function (evt) {
      var el = evt.target.closest("[data-i]");
      if (el && !drag) showTip(+el.getAttribute("data-i"), el);
    });
    svg.addEventListener("mouseout", function (evt) {
      if (evt.target.closest("[data-i]")) tip.style.display = "none";
    });
    svg.addEventListener("click", function (evt) {
      if (dragged) { dragged = false; return; }
      var el = evt.target.closest("[data-i]");
      if (el) { selected = +el.getAttribute("data-i"); highlight(selected); }
      else { selected = null; clearHighlight(); }
    });
    slider.addEventListener("input", apply);
    if (tierSelect) tierSelect.addEventListener("change", function () { tier = +tierSelect.value; apply(); });
    root.classList.add("cl-live");  // controls appear first: the fit measures the space left below them
    apply();
    fit();
  }

  window.cageLensViewer = { graph: graph };
})();
