// Drives the registry console as a person would, in headless Chromium (Debian's package) through
// Playwright's driver (playwright-core, pinned in package.json): the project list, a project's
// page, a download link, a form post without its token, and the promote form. Prints what it saw
// as one JSON object; the Rust test (tests/console.rs) judges it and checks storage afterwards.
//
//   node tests/browser/console.mjs '{"base": "http://127.0.0.1:PORT", "project": "…", …}'
import { chromium } from 'playwright-core';
import { readFile } from 'node:fs/promises';
import { createHash } from 'node:crypto';

const args = JSON.parse(process.argv[2]);
const browser = await chromium.launch({
  executablePath: args.chromium,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
const out = {};
try {
  const context = await browser.newContext({ acceptDownloads: true, viewport: { width: 1280, height: 900 } });
  const page = await context.newPage();
  const text = (selector) => page.locator(selector).first().innerText();

  // The list: every project by name, each a link to its page.
  await page.goto(`${args.base}/api/history`);
  out.listHeading = await text('h1');
  out.listText = await page.locator('table').first().innerText();
  await Promise.all([
    page.waitForURL(`**/api/history/${args.project}**`),
    page.getByRole('link', { name: args.projectName, exact: true }).click(),
  ]);

  // The project's page.
  out.title = await text('h1');
  out.pointer = await text('[data-channel="production"][data-target="pointer"]');
  out.productionOnnx = await text('[data-channel="production"][data-target="ONNX"]');
  out.latestOnnx = await text('[data-channel="latest"][data-target="ONNX"]');
  out.gates = await page.locator('[data-gate]').allInnerTexts();
  out.forms = await page.locator('form').count();
  out.chartSeries = await page.locator('#chart polyline').count();
  out.chartThresholds = await page.locator('#chart [data-threshold]').count();
  out.events = await page.locator('#events tr').count();
  // The page as a person first sees it (kept as docs/console.png).
  if (args.screenshot) {
    await page.screenshot({ path: args.screenshot, fullPage: false });
  }
  if (args.chartShot) {
    await page.locator('#chart').screenshot({ path: args.chartShot });
  }

  // A release link: the browser downloads the model's bytes with nothing but the link.
  const link = page.getByRole('link', { name: args.releasePath, exact: true });
  out.releaseHref = await link.getAttribute('href');
  const [download] = await Promise.all([page.waitForEvent('download'), link.click()]);
  const bytes = await readFile(await download.path());
  out.downloaded = { size: bytes.length, sha256: createHash('sha256').update(bytes).digest('hex') };

  // A form post without the page's token (the browser's own cookie goes with it): refused.
  const forged = await context.request.post(`${args.base}/api/history/${args.project}/promote`, {
    form: { channel: 'production', iteration: args.first },
  });
  out.forged = { status: forged.status(), body: await forged.text() };
  // A token of another form (rollback) on the promote form: refused as well.
  const rollbackToken = await page.locator('form[action$="/rollback"] input[name="token"]').first().getAttribute('value');
  const misused = await context.request.post(`${args.base}/api/history/${args.project}/promote`, {
    form: { channel: 'production', iteration: args.first, token: rollbackToken },
  });
  out.misused = { status: misused.status() };

  // Promote the first iteration with the page's own form.
  const row = page.locator(`tr[data-iteration="${args.first}"]`);
  await row.locator('select[name="channel"]').selectOption('production');
  await row.locator('input[name="reason"]').fill('back to the first model');
  await Promise.all([page.waitForLoadState('load'), row.getByRole('button', { name: 'Promote' }).click()]);
  await page.locator('#notice').waitFor();
  out.notice = await text('#notice');
  out.pointerAfter = await text('[data-channel="production"][data-target="pointer"]');
  out.productionOnnxAfter = await text('[data-channel="production"][data-target="ONNX"]');
} catch (e) {
  out.error = String(e && e.stack || e);
} finally {
  await browser.close();
}
console.log(JSON.stringify(out));
