// A small wrapper over uPlot shared by the overview and usage pages: time-series line or
// (stacked) bar charts that follow their container's width, keep their state across refreshes,
// and report on the container how many points they drew (`data-points`, for tests and humans).

import uPlot from "../vendor/uplot/uPlot.esm.js";

// Distinct enough on white, and in the same order everywhere so a group keeps its colour.
export const PALETTE = [
  "#2f6fed", "#e8590c", "#2b8a3e", "#c2255c", "#7048e8",
  "#0c8599", "#e67700", "#5c940d", "#a61e4d", "#495057",
];
export const color = (i) => PALETTE[i % PALETTE.length];

const HEIGHT = 220;
const compact = new Intl.NumberFormat(undefined, { notation: "compact", maximumFractionDigits: 1 });
const precise = new Intl.NumberFormat(undefined, { maximumFractionDigits: 2 });

const plots = new WeakMap(); // container -> { plot, signature, observer, raw }

// Axis ticks: 1.2K rather than 1200, and as many decimals as the tick spacing needs (0.05,
// 0.1, 0.15 rather than 0.1, 0.1, 0.2).
function axisValues(suffix) {
  return (_u, ticks, _axis, _space, incr) => {
    const decimals = incr > 0 && incr < 1 ? Math.min(6, Math.ceil(-Math.log10(incr) - 1e-9)) : 0;
    const format = Math.max(...ticks.map(Math.abs)) >= 10_000 ? compact
      : new Intl.NumberFormat(undefined, { maximumFractionDigits: decimals });
    return ticks.map((v) => `${format.format(v)}${suffix}`);
  };
}

function legendValue(unit, raw) {
  return (_u, value, seriesIdx, idx) => {
    const v = raw && idx != null ? raw[seriesIdx - 1][idx] : value;
    return v == null ? "–" : `${precise.format(v)}${unit}`;
  };
}

// uPlot has no stacking of its own: each series is drawn as the sum of itself and all series
// after it, first (tallest) to last, so every bar covers the lower part of the one before it.
function stack(values) {
  const out = values.map((v) => v.slice());
  for (let k = out.length - 2; k >= 0; k--) {
    for (let i = 0; i < out[k].length; i++) out[k][i] = (out[k][i] ?? 0) + (out[k + 1][i] ?? 0);
  }
  return out;
}

// Indices of values with no value on either side: no line reaches them.
function lonePoints(u, seriesIdx, show) {
  if (show) return null; // every point is drawn anyway
  const ys = u.data[seriesIdx];
  const lone = [];
  for (let i = 0; i < ys.length; i++) {
    if (ys[i] != null && ys[i - 1] == null && ys[i + 1] == null) lone.push(i);
  }
  return lone.length ? lone : null;
}

function countPoints(series) {
  return series.reduce((n, s) => n + s.values.filter((v) => v != null).length, 0);
}

// `raw`: the unstacked values the legend shows (null when not stacked).
function options(container, spec, raw) {
  const { unit = "", bars = false, utc = false, step } = spec;
  const barPaths = bars ? uPlot.paths.bars({ size: [0.7, 48], align: 0 }) : undefined;
  const series = spec.series.map((s, i) => ({
    label: s.label,
    stroke: s.color ?? color(i),
    fill: bars ? (s.color ?? color(i)) : undefined,
    width: bars ? 1 : 1.5,
    dash: s.dash,
    paths: barPaths,
    spanGaps: false,
    // uPlot marks points only where they are sparse; a lone value between gaps (a
    // percentile of the one busy minute) would otherwise draw nothing at all.
    points: bars ? { show: false } : { filter: lonePoints },
    value: legendValue(unit, raw),
  }));
  const opts = {
    width: Math.max(240, container.clientWidth),
    height: HEIGHT,
    series: [{ label: "time", value: (_u, v) => (v == null ? "–" : timeLabel(v, utc, step)) }, ...series],
    axes: [
      { stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6eb" } },
      {
        stroke: "#667085", grid: { stroke: "#eef0f3" }, ticks: { stroke: "#e3e6eb" },
        values: axisValues(spec.axisSuffix ?? ""), size: 56, label: spec.axisLabel, labelSize: spec.axisLabel ? 18 : 0,
      },
    ],
    scales: { y: { range: (_u, _min, max) => [0, max > 0 ? max * 1.1 : 1] } },
    legend: { live: true },
    cursor: { drag: { x: true, y: false } },
  };
  if (utc) opts.tzDate = (ts) => uPlot.tzDate(new Date(ts * 1e3), "Etc/UTC");
  if (bars && step) {
    // Half a bucket of room on each side, or the first and last bars are cut in half.
    opts.scales.x = { time: true, range: (_u, min, max) => [min - step / 2, max + step / 2] };
  }
  return opts;
}

function timeLabel(seconds, utc, step) {
  const date = new Date(seconds * 1000);
  const long = step >= 86400;
  const o = long ? { year: "numeric", month: "short", day: "numeric" }
    : { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" };
  if (utc) o.timeZone = "UTC";
  return date.toLocaleString(undefined, o);
}

// Draw `spec` into `container`: {x: [unix s], series: [{label, values, color?, dash?}], unit,
// axisLabel, axisSuffix, bars, stacked, utc, step}. The same labels again only replace the data (legend
// toggles and zoom survive a refresh); other labels build a new chart.
export function drawChart(container, spec) {
  const signature = JSON.stringify([spec.series.map((s) => [s.label, s.color, s.dash]), spec.unit, spec.step]);
  const values = spec.series.map((s) => s.values);
  const data = [spec.x, ...(spec.stacked ? stack(values) : values)];
  let held = plots.get(container);
  if (held && held.signature === signature) {
    // The legend reads the unstacked values through the array it was built with.
    if (held.raw) held.raw.splice(0, held.raw.length, ...values);
    held.plot.setData(data);
  } else {
    destroyChart(container);
    const raw = spec.stacked ? values.slice() : null;
    const plot = new uPlot(options(container, spec, raw), data, container);
    const observer = new ResizeObserver(() => {
      const width = Math.max(240, container.clientWidth);
      if (Math.abs(width - plot.width) > 1) plot.setSize({ width, height: HEIGHT });
    });
    observer.observe(container);
    held = { plot, signature, observer, raw };
    plots.set(container, held);
  }
  container.dataset.points = String(countPoints(spec.series));
  container.dataset.series = String(spec.series.length);
  return held.plot;
}

export function destroyChart(container) {
  const held = plots.get(container);
  if (held) {
    held.observer.disconnect();
    held.plot.destroy();
    plots.delete(container);
  }
  container.dataset.points = "0";
  container.dataset.series = "0";
}

// Bucket starts from `start` (unix s) up to `end`, `step` apart: the x axis with every bucket,
// so an empty bucket is a gap or a zero rather than a missing tick.
export function buckets(start, end, step) {
  const xs = [];
  for (let t = start; t < end; t += step) xs.push(t);
  return xs;
}
