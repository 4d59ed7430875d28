// d3 v7 with the d3-jetpack helpers circuit-tracer's viewer calls (its index.html loads d3 and a jetpack build from
// the web). Built by .ci/run with esbuild into one script that the browser test serves in their place.
import * as d3 from "d3";
import {selection} from "d3-selection";
import {transition} from "d3-transition";
import translate from "./node_modules/d3-jetpack/src/translate-selection.js";
import append from "./node_modules/d3-jetpack/src/append.js";
import insert from "./node_modules/d3-jetpack/src/insert.js";
import parent from "./node_modules/d3-jetpack/src/parent.js";
import selectAppend from "./node_modules/d3-jetpack/src/selectAppend.js";
import tspans from "./node_modules/d3-jetpack/src/tspans.js";
import appendMany from "./node_modules/d3-jetpack/src/appendMany.js";
import at from "./node_modules/d3-jetpack/src/at.js";
import st from "./node_modules/d3-jetpack/src/st.js";
import jetpackConventions from "./node_modules/d3-jetpack/src/conventions.js";
import drawAxis from "./node_modules/d3-jetpack/src/drawAxis.js";
import nestBy from "./node_modules/d3-jetpack/src/nestBy.js";
import clamp from "./node_modules/d3-jetpack/src/clamp.js";
import f from "./node_modules/d3-jetpack/src/f.js";
import ascendingKey from "./node_modules/d3-jetpack/src/ascendingKey.js";
import descendingKey from "./node_modules/d3-jetpack/src/descendingKey.js";
import round from "./node_modules/d3-jetpack/src/round.js";
import wordwrap from "./node_modules/d3-jetpack/src/wordwrap.js";
Object.assign(selection.prototype, {translate, append, insert, parent, selectAppend, tspans, appendMany, at, st,
  prop: selection.prototype.property});
Object.assign(transition.prototype, {translate, at, st});
function conventions(options) {  // the newer jetpack also hands back drawAxis on the result
  const c = jetpackConventions(options);
  c.drawAxis = c.drawAxis || (() => drawAxis(c));
  return c;
}
window.d3 = Object.assign({}, d3, {conventions, nestBy, clamp, f, ascendingKey, descendingKey, round, wordwrap,
  attachTooltip: function () {}});
