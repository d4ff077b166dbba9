// Fair Adaptors: draws the Bias Audit chart inside the "Bias Audit" node (FairBiasAudit), updated on each execution.
// Per attribute: the observed class shares among detected faces (bars, 95% interval whiskers) beside the target
// (grey bars), with the distance to the target and the face rate. Reads the node's `ui.fair_audit` payload
// (fair_core.audit.AuditResult.to_json() without the per-image records). Plain canvas, no library.
import { app } from "../../scripts/app.js";

const NODE = "FairBiasAudit";
const WIDTH = 360;
const HEIGHT = 190;
const COLOURS = { observed: "#4a78c2", target: "#9a9a9a", text: "#dddddd", grid: "#555555" };

function asArray(value) {
  return Array.isArray(value) ? value : [value];
}

function drawMessage(canvas, text) {
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = COLOURS.text;
  ctx.font = "12px sans-serif";
  ctx.fillText(text, 10, 20);
}

function drawGroup(ctx, name, group, x0, width, top, bottom) {
  const classes = group.classes;
  const observed = asArray(group.frequencies?.estimate ?? []).map((v) => v ?? 0);
  const low = asArray(group.frequencies?.low ?? []).map((v) => v ?? 0);
  const high = asArray(group.frequencies?.high ?? []).map((v) => v ?? 0);
  const target = asArray(group.target ?? []);
  const slot = width / Math.max(classes.length, 1);
  const bar = Math.min(18, slot / 3);
  const y = (share) => bottom - share * (bottom - top);
  ctx.strokeStyle = COLOURS.grid;
  ctx.beginPath();
  ctx.moveTo(x0, bottom + 0.5);
  ctx.lineTo(x0 + width, bottom + 0.5);
  ctx.stroke();
  classes.forEach((label, i) => {
    const centre = x0 + slot * (i + 0.5);
    ctx.fillStyle = COLOURS.observed;
    ctx.fillRect(centre - bar - 1, y(observed[i] ?? 0), bar, bottom - y(observed[i] ?? 0));
    ctx.fillStyle = COLOURS.target;
    ctx.fillRect(centre + 1, y(target[i] ?? 0), bar, bottom - y(target[i] ?? 0));
    ctx.strokeStyle = COLOURS.text;
    ctx.beginPath();  // the interval whisker
    ctx.moveTo(centre - bar / 2 - 1, y(low[i] ?? 0));
    ctx.lineTo(centre - bar / 2 - 1, y(high[i] ?? 0));
    ctx.stroke();
    ctx.fillStyle = COLOURS.text;
    ctx.font = "10px sans-serif";
    ctx.textAlign = "center";
    ctx.fillText(String(label).slice(0, 10), centre, bottom + 12);
  });
  const distance = group.distance?.estimate;
  ctx.textAlign = "left";
  ctx.font = "11px sans-serif";
  ctx.fillText(`${name}: distance ${distance == null ? "n/a" : distance.toFixed(2)}`, x0 + 2, top - 6);
}

export function drawAudit(canvas, report) {
  const summary = report?.summary;
  if (!summary) return drawMessage(canvas, "no audit yet");
  const groups = Object.entries(summary.groups ?? {}).filter(([name]) => !name.includes(" x "));
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.fillStyle = COLOURS.text;
  ctx.font = "12px sans-serif";
  ctx.textAlign = "left";
  const rate = summary.face_rate?.estimate;
  ctx.fillText(`${summary.num_faces}/${summary.num_images} faces` +
    (rate == null ? "" : ` (face rate ${(100 * rate).toFixed(0)}%)`), 8, 14);
  ctx.fillStyle = COLOURS.observed;
  ctx.fillRect(canvas.width - 140, 6, 10, 10);
  ctx.fillStyle = COLOURS.target;
  ctx.fillRect(canvas.width - 58, 6, 10, 10);
  ctx.fillStyle = COLOURS.text;
  ctx.fillText("observed", canvas.width - 126, 15);
  ctx.fillText("target", canvas.width - 44, 15);
  if (!groups.length || !summary.num_faces) {
    ctx.fillText("no faces: no bias figures", 8, 40);
    return;
  }
  const width = (canvas.width - 16) / groups.length;
  groups.forEach(([name, group], i) => drawGroup(ctx, name, group, 8 + i * width, width - 10, 44, canvas.height - 18));
}

app.registerExtension({
  name: "fair.adaptors.auditChart",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const canvas = document.createElement("canvas");
      canvas.width = WIDTH;
      canvas.height = HEIGHT;
      canvas.className = "fair-audit-chart";
      this.fairAuditCanvas = canvas;
      this.addDOMWidget("fair_audit_chart", "fair_audit_chart", canvas, { serialize: false, hideOnZoom: false });
      drawMessage(canvas, "queue the workflow to see the audit");
      this.setSize([Math.max(this.size[0], WIDTH + 20), Math.max(this.size[1], HEIGHT + 80)]);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      onExecuted?.apply(this, arguments);
      const report = message?.fair_audit?.[0];
      this.fairAuditReport = report;
      if (this.fairAuditCanvas) drawAudit(this.fairAuditCanvas, report);
    };
  },
});
