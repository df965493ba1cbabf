// Opens the dashboard in headless Chromium and checks what an operator reads there: the
// Engines panel lists the engine as running; the oldest-undelivered card says why the
// oldest row waits (its key behind a dead letter); the rate chart's history survives a
// reload (the server keeps it); a dead letter's payload shows as text and as hex once the
// token is entered; the favicon is served; "requeue" moves a dead letter back to the outbox.
// Screenshots: <shots>/dashboard.png, dashboard-before.png, dashboard-payload.png.
// Usage: node click.mjs <url> <token> <dead letter to requeue> <shots dir> <engine id> <dead letter to view>
import { chromium } from "playwright-core";

const [url, token, id, shots, engine, viewId] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
const samples = async page => {
  const t = await page.locator("#ratesText", { hasText: /[1-9]\d* samples? every/ }).textContent({ timeout: 15000 });
  return Number(/(\d+) samples? every/.exec(t)[1]);
};
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
  const fav = await page.request.get(url + "favicon.svg");
  if (fav.status() !== 200 || !fav.headers()["content-type"].startsWith("image/svg+xml")) {
    throw new Error(`favicon: ${fav.status()} ${fav.headers()["content-type"]}`);
  }
  await page.goto(url);
  await page.fill("#token", token);
  await page.dispatchEvent("#token", "change");
  const row = page.locator(`tr[data-id="${id}"]`);
  await row.waitFor({ timeout: 15000 });
  // Locator waits, not waitForFunction: the page's CSP forbids the eval that one needs.
  const engineRow = page.locator(`#engines tr[data-engine="${engine}"]`);
  await engineRow.locator("td.state", { hasText: "running" }).waitFor({ timeout: 15000 });
  console.log("engine listed as running:", engine);
  await page.locator("#oldestCard .why", { hasText: "waits behind dead letter" }).waitFor({ timeout: 15000 });
  console.log("oldest card:", await page.locator("#oldestCard").textContent());
  for (const name of ["claimed (in flight)", "awaiting broker confirm"]) {
    await page.locator(".card .k", { hasText: name }).waitFor({ timeout: 5000 });
  }

  // The chart's history is the server's: a reload shows at least as many samples at once.
  const before = await samples(page);
  await page.reload();
  const after = await samples(page);
  if (!(before > 0 && after >= before)) throw new Error(`rate history lost on reload: ${before} → ${after}`);
  console.log(`rate samples: ${before} before the reload, ${after} after`);
  await page.screenshot({ path: `${shots}/dashboard-before.png`, fullPage: true });

  // A payload, as text then as hex (the token was kept in the tab's session storage).
  await page.locator(`tr[data-id="${viewId}"] button.payload`).click();
  await page.locator("#payload[data-view=text]").waitFor({ timeout: 15000 });
  await page.locator("#asHex").click();
  await page.locator("#payload[data-view=hex]", { hasText: "00000000  " }).waitFor({ timeout: 5000 });
  console.log("payload as hex:", (await page.locator("#payload").textContent()).split("\n").pop());
  await page.screenshot({ path: `${shots}/dashboard-payload.png`, fullPage: true });

  await page.locator(`tr[data-id="${id}"] button.requeue`).click();
  await page.locator("#notice", { hasText: `requeued ${id}` }).waitFor({ timeout: 15000 });
  await page.locator(`tr[data-id="${id}"]`).waitFor({ state: "detached", timeout: 15000 });
  await page.screenshot({ path: `${shots}/dashboard.png`, fullPage: true });
  console.log("requeued via the dashboard:", id);
} finally {
  await browser.close();
}
