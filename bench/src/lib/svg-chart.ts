// Hand-written SVG: panels of horizontal grouped bars (one row per tool, one bar per series
// with a min-max whisker) and a line chart. No dependencies; plain SVG 1.1 that browsers,
// rsvg and ImageMagick render.

export interface Stat { median: number; min: number; max: number }

export interface BarPanel {
  title: string;
  /** Row labels, top to bottom. */
  rows: string[];
  series: Array<{ name: string; color: string; values: Array<Stat | undefined> }>;
  unit: string;
}

export interface LineChart {
  title: string;
  xLabel: string;
  yLabel: string;
  /** Tick labels; a point's x is an index into them. */
  xTicks: string[];
  series: Array<{ name: string; color: string; dashed?: boolean; points: Array<{ x: number; y: number }>; /** Unconnected hollow markers. */ extra?: Array<{ x: number; y: number }> }>;
}

const FONT = 'font-family="DejaVu Sans, Helvetica, Arial, sans-serif"';
const WIDTH = 960;
const LABEL_W = 250;
const ROW_BAR_H = 9;
const ROW_GAP = 8;

function esc(s: string): string {
  return s.replace(/&/g, '&amp;').replace(/</g, '&lt;').replace(/>/g, '&gt;').replace(/"/g, '&quot;');
}

/** A round axis maximum at or above `v` and its tick step. */
function niceAxis(v: number): { max: number; step: number } {
  if (!(v > 0)) return { max: 1, step: 0.25 };
  const raw = v / 5;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((s) => s >= raw)!;
  return { max: Math.ceil(v / step) * step, step };
}

function text(x: number, y: number, s: string, attrs = ''): string {
  return `<text x="${x.toFixed(1)}" y="${y.toFixed(1)}" ${FONT} ${attrs}>${esc(s)}</text>`;
}

function barPanel(p: BarPanel, top: number): { svg: string; height: number } {
  const out: string[] = [];
  const plotX = LABEL_W;
  const plotW = WIDTH - LABEL_W - 70;
  const rowH = p.series.length * ROW_BAR_H + ROW_GAP;
  const plotTop = top + 28;
  const plotH = p.rows.length * rowH;
  const all = p.series.flatMap((s) => s.values.filter((v): v is Stat => v !== undefined).map((v) => Math.max(v.max, v.median)));
  const { max, step } = niceAxis(Math.max(1, ...all));
  const sx = (v: number) => plotX + (v / max) * plotW;
  out.push(text(10, top + 16, p.title, 'font-size="14" font-weight="bold"'));
  // Legend at the panel's top right.
  let lx = WIDTH - 20;
  for (const s of [...p.series].reverse()) {
    lx -= 8 + s.name.length * 7;
    out.push(`<rect x="${lx}" y="${top + 7}" width="10" height="10" fill="${s.color}"/>`, text(lx + 14, top + 16, s.name, 'font-size="11"'));
    lx -= 14;
  }
  for (let t = 0; t <= max + 1e-9; t += step) {
    const x = sx(t);
    out.push(`<line x1="${x.toFixed(1)}" y1="${plotTop}" x2="${x.toFixed(1)}" y2="${plotTop + plotH}" stroke="#ddd"/>`);
    out.push(text(x, plotTop + plotH + 13, String(Math.round(t)), 'font-size="10" text-anchor="middle" fill="#555"'));
  }
  out.push(text(plotX + plotW / 2, plotTop + plotH + 27, p.unit, 'font-size="11" text-anchor="middle" fill="#333"'));
  p.rows.forEach((row, r) => {
    const y0 = plotTop + r * rowH + ROW_GAP / 2;
    if (r % 2 === 1) out.push(`<rect x="0" y="${y0 - ROW_GAP / 2}" width="${WIDTH}" height="${rowH}" fill="#f6f6f6"/>`);
    out.push(text(plotX - 6, y0 + (p.series.length * ROW_BAR_H) / 2 + 4, row, 'font-size="11" text-anchor="end"'));
    p.series.forEach((s, i) => {
      const v = s.values[r];
      const y = y0 + i * ROW_BAR_H;
      if (!v) return;
      out.push(`<rect x="${plotX}" y="${y}" width="${Math.max(0.5, sx(v.median) - plotX).toFixed(1)}" height="${ROW_BAR_H - 1}" fill="${s.color}"><title>${esc(`${row} ${s.name}: ${v.median.toFixed(0)} (${v.min.toFixed(0)}-${v.max.toFixed(0)}) ${p.unit}`)}</title></rect>`);
      const ym = y + (ROW_BAR_H - 1) / 2;
      out.push(`<line x1="${sx(v.min).toFixed(1)}" y1="${ym}" x2="${sx(v.max).toFixed(1)}" y2="${ym}" stroke="#222" stroke-width="1"/>`);
      out.push(text(Math.max(sx(v.median), sx(v.max)) + 4, y + ROW_BAR_H - 1, v.median.toFixed(0), 'font-size="9" fill="#333"'));
    });
  });
  out.push(`<line x1="${plotX}" y1="${plotTop}" x2="${plotX}" y2="${plotTop + plotH}" stroke="#333"/>`);
  return { svg: out.join('\n'), height: plotH + 28 + 40 };
}

function lineChart(c: LineChart, top: number): { svg: string; height: number } {
  const out: string[] = [];
  const plotX = 80;
  const plotW = WIDTH - plotX - 230;
  const plotTop = top + 30;
  const plotH = 260;
  const ys = c.series.flatMap((s) => [...s.points, ...(s.extra ?? [])].map((p) => p.y));
  const { max, step } = niceAxis(Math.max(1, ...ys));
  const sx = (i: number) => plotX + (c.xTicks.length === 1 ? plotW / 2 : (i / (c.xTicks.length - 1)) * plotW);
  const sy = (v: number) => plotTop + plotH - (v / max) * plotH;
  out.push(text(10, top + 16, c.title, 'font-size="14" font-weight="bold"'));
  for (let t = 0; t <= max + 1e-9; t += step) {
    out.push(`<line x1="${plotX}" y1="${sy(t).toFixed(1)}" x2="${plotX + plotW}" y2="${sy(t).toFixed(1)}" stroke="#ddd"/>`);
    out.push(text(plotX - 6, sy(t) + 4, String(Math.round(t)), 'font-size="10" text-anchor="end" fill="#555"'));
  }
  c.xTicks.forEach((t, i) => out.push(text(sx(i), plotTop + plotH + 15, t, 'font-size="11" text-anchor="middle"')));
  out.push(text(plotX + plotW / 2, plotTop + plotH + 32, c.xLabel, 'font-size="11" text-anchor="middle" fill="#333"'));
  out.push(text(16, plotTop + plotH / 2, c.yLabel, `font-size="11" text-anchor="middle" fill="#333" transform="rotate(-90 16 ${plotTop + plotH / 2})"`));
  out.push(`<rect x="${plotX}" y="${plotTop}" width="${plotW}" height="${plotH}" fill="none" stroke="#333"/>`);
  c.series.forEach((s, i) => {
    const pts = s.points.map((p) => `${sx(p.x).toFixed(1)},${sy(p.y).toFixed(1)}`).join(' ');
    if (s.points.length > 1) out.push(`<polyline points="${pts}" fill="none" stroke="${s.color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/>`);
    for (const p of s.points) out.push(`<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="3.5" fill="${s.color}"><title>${esc(`${s.name}: ${c.xTicks[p.x]} -> ${p.y.toFixed(0)}`)}</title></circle>`);
    for (const p of s.extra ?? []) out.push(`<circle cx="${sx(p.x).toFixed(1)}" cy="${sy(p.y).toFixed(1)}" r="4" fill="white" stroke="${s.color}" stroke-width="2"><title>${esc(`${s.name}: ${c.xTicks[p.x]} -> ${p.y.toFixed(0)}`)}</title></circle>`);
    const ly = plotTop + 10 + i * 18;
    const lx = plotX + plotW + 16;
    out.push(`<line x1="${lx}" y1="${ly}" x2="${lx + 26}" y2="${ly}" stroke="${s.color}" stroke-width="2"${s.dashed ? ' stroke-dasharray="6 4"' : ''}/>`, text(lx + 32, ly + 4, s.name, 'font-size="11"'));
  });
  return { svg: out.join('\n'), height: plotH + 30 + 45 };
}

/** The whole document: a title block, the bar panels, then the line charts. */
export function renderChart(o: { title: string; subtitle: string[]; panels: BarPanel[]; lines: LineChart[] }): string {
  const parts: string[] = [];
  let y = 10;
  parts.push(text(10, y + 18, o.title, 'font-size="18" font-weight="bold"'));
  y += 26;
  for (const s of o.subtitle) {
    parts.push(text(10, y + 14, s, 'font-size="11" fill="#444"'));
    y += 16;
  }
  y += 10;
  for (const p of o.panels) {
    const r = barPanel(p, y);
    parts.push(r.svg);
    y += r.height + 10;
  }
  for (const l of o.lines) {
    const r = lineChart(l, y);
    parts.push(r.svg);
    y += r.height + 10;
  }
  return `<?xml version="1.0" encoding="UTF-8"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="${WIDTH}" height="${Math.ceil(y)}" viewBox="0 0 ${WIDTH} ${Math.ceil(y)}">\n<rect width="100%" height="100%" fill="white"/>\n${parts.join('\n')}\n</svg>\n`;
}
