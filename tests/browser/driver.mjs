// The real-browser tier's driver: ComfyUI's own frontend in headless Chromium, used as a user uses it.
//   node driver.mjs URL OUT_DIR PACK_FOLDER QUEUE_NAMES(comma-separated) [TIMEOUT_S]
// For every template the server lists for PACK_FOLDER (GET /workflow_templates, as the template browser does):
// fetch it from /api/workflow_templates/PACK_FOLDER/NAME.json, load it with the app's own call
// (app.loadGraphData), then record missing node types, visible dialogs (missing nodes / models) and every node's
// widget values beside the file's widgets_values. The templates named in QUEUE_NAMES are queued from the app
// (app.queuePrompt) and waited for in /history; a screenshot is saved after each. Writes OUT_DIR/result.json.
// Needs @sparticuz/chromium and puppeteer-core: the test copies this file into the folder that holds their
// node_modules (outside the repository) and runs it there, so the imports below resolve.
import chromium from '@sparticuz/chromium';
import puppeteer from 'puppeteer-core';
import fs from 'node:fs';
import path from 'node:path';

const [url, outDir, packFolder, queueArg, timeoutArg] = process.argv.slice(2);
const queue = new Set((queueArg || '').split(',').filter(Boolean));
const timeoutMs = 1000 * Number(timeoutArg || 300);

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const result = { templates: {}, listed: null, console_errors: [] };

const browser = await puppeteer.launch({
  executablePath: await chromium.executablePath(), args: chromium.args, headless: true,
  defaultViewport: { width: 1800, height: 1000 },
});
try {
  const page = await browser.newPage();
  page.on('pageerror', (e) => result.console_errors.push(String(e).slice(0, 300)));
  await page.goto(url, { waitUntil: 'networkidle2', timeout: 180000 });
  await page.waitForFunction(() => window.app && window.app.graph && window.LiteGraph, { timeout: 180000 });
  await sleep(2000);
  result.listed = await page.evaluate(async () => (await fetch('/workflow_templates')).json());

  for (const name of result.listed[packFolder] || []) {
    const r = { name };
    result.templates[name] = r;
    // close whatever the previous template left open
    await page.evaluate(() => document.querySelectorAll('.p-dialog-close-button').forEach((b) => b.click()));
    const file = await page.evaluate(async (u) => (await fetch(u)).json(),
      `/api/workflow_templates/${encodeURIComponent(packFolder)}/${encodeURIComponent(name)}.json`);
    await page.evaluate(async (wf, n) => { await window.app.loadGraphData(wf, true, true, n); }, file, name);
    await sleep(2000);
    const seen = await page.evaluate(() => ({
      nodes: window.app.graph._nodes.map((n) => ({
        id: n.id, type: n.type, registered: !!window.LiteGraph.registered_node_types[n.type],
        widgets: (n.widgets || []).map((w) => [w.name, w.value]),
      })),
      // dialogs the user would see (missing nodes, missing models, errors)
      dialogs: [...document.querySelectorAll('.p-dialog, .comfy-modal')]
        .filter((d) => d.offsetParent !== null)
        .map((d) => (d.innerText || '').replace(/\s+/g, ' ').trim().slice(0, 500)),
    }));
    const saved = Object.fromEntries(file.nodes.map((n) => [n.id, n.widgets_values ?? []]));
    r.missing_types = seen.nodes.filter((n) => !n.registered).map((n) => n.type);
    r.dialogs = seen.dialogs;
    r.widget_diffs = seen.nodes
      .filter((n) => JSON.stringify(n.widgets.map((w) => w[1])) !== JSON.stringify(saved[n.id]))
      .map((n) => ({ id: n.id, type: n.type, file: saved[n.id], shown: n.widgets }));
    r.nodes = seen.nodes.length;

    if (queue.has(name)) {
      const before = await page.evaluate(async () => Object.keys(await (await fetch('/history')).json()));
      const t0 = Date.now();
      await page.evaluate(async () => { await window.app.queuePrompt(0); });
      let entry = null;
      while (Date.now() - t0 < timeoutMs) {
        await sleep(1000);
        const hist = await page.evaluate(async () => (await fetch('/history')).json());
        const id = Object.keys(hist).find((k) => !before.includes(k));
        const done = id && hist[id].status && (hist[id].status.completed || hist[id].status.status_str === 'error');
        if (done) { entry = hist[id]; break; }
      }
      r.seconds = (Date.now() - t0) / 1000;
      r.status = entry ? entry.status.status_str : 'timeout';
      r.messages = entry ? entry.status.messages.filter((m) => m[0] === 'execution_error') : [];
      r.images = entry ? Object.values(entry.outputs).flatMap((o) => o.images || []) : [];
      await sleep(1500); // the image shows in the Save Image node
      // the whole graph in view for the screenshot (the frontend's own command; older frontends lack it)
      await page.evaluate(async () => {
        try { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); } catch (e) { /* none */ }
      });
      await sleep(500);
      await page.screenshot({ path: path.join(outDir, `${name}.png`) });
      // and the result up close: the Save Image node centred at 3x (the toy images are 32x32)
      await page.evaluate(() => {
        const canvas = window.app.canvas;
        const save = window.app.graph._nodes.find((n) => n.type === 'SaveImage');
        if (!save) return;
        const scale = 3;
        const [w, h] = [canvas.canvas.width / (window.devicePixelRatio || 1), canvas.canvas.height / (window.devicePixelRatio || 1)];
        canvas.ds.scale = scale;  // screen = (graph + offset) * scale
        canvas.ds.offset = [w / 2 / scale - (save.pos[0] + save.size[0] / 2), h / 2 / scale - (save.pos[1] + save.size[1] / 2)];
        canvas.setDirty(true, true);
      });
      await sleep(1500);
      await page.screenshot({ path: path.join(outDir, `${name}_result.png`) });
      continue;
    }
    await page.screenshot({ path: path.join(outDir, `${name}.png`) });
  }
} finally {
  await browser.close();
}
fs.writeFileSync(path.join(outDir, 'result.json'), JSON.stringify(result, null, 1));
