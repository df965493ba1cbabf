// Opens the dashboard in headless Chromium, checks the Engines panel lists the engine as
// running, enters the admin token, clicks "requeue" on one dead letter, waits for the page
// to confirm it, and takes a screenshot.
// Usage: node click.mjs <dashboard url> <token> <dead letter id> <screenshot.png> <engine id>
import { chromium } from "playwright-core";

const [url, token, id, shot, engine] = process.argv.slice(2);
const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"],
});
try {
  const page = await browser.newPage({ viewport: { width: 1280, height: 720 } });
  await page.goto(url);
  await page.fill("#token", token);
  await page.dispatchEvent("#token", "change");
  const row = page.locator(`tr[data-id="${id}"]`);
  await row.waitFor({ timeout: 15000 });
  // Locator waits, not waitForFunction: the page's CSP forbids the eval that one needs.
  await page.locator(".card").nth(6).waitFor({ timeout: 15000 });
  const engineRow = page.locator(`#engines tr[data-engine="${engine}"]`);
  await engineRow.locator("td.state", { hasText: "running" }).waitFor({ timeout: 15000 });
  console.log("engine listed as running:", engine);
  await page.screenshot({ path: shot.replace(/\.png$/, "-before.png"), fullPage: true });
  await row.locator("button.requeue").click();
  await page.locator("#notice", { hasText: `requeued ${id}` }).waitFor({ timeout: 15000 });
  await row.waitFor({ state: "detached", timeout: 15000 });
  await page.screenshot({ path: shot, fullPage: true });
  console.log("requeued via the dashboard:", id);
} finally {
  await browser.close();
}
