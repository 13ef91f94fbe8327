// Calls the talkline web demo from headless Chromium with a WAV as the microphone, and prints
// what the page saw as one JSON object on stdout. The Rust test `browser_call` makes the
// assertions; this script only drives the page and measures.
//
// usage: node call.mjs URL QUESTION.wav OUT_DIR
import { chromium } from "playwright-core";
import { join } from "node:path";

const [url, wav, outDir] = process.argv.slice(2);
if (!url || !wav || !outDir) {
  console.error("usage: node call.mjs URL QUESTION.wav OUT_DIR");
  process.exit(2);
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || "/usr/bin/chromium",
  args: [
    // This machine's network is closed: without these, Chromium keeps dialing Google's hosts.
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    `--use-file-for-fake-audio-capture=${wav}%noloop`,
    "--autoplay-policy=no-user-gesture-required",
  ],
});
let result = { ok: false };
const page = await browser.newPage();
const console_ = [];
page.on("console", (m) => console_.push(`${m.type()}: ${m.text()}`));
try {
  await page.goto(url);
  await page.click("#call");
  await page.waitForFunction(() => window.talkline.state === "live" || window.talkline.error, null, {
    timeout: 15_000,
  });
  result.connected = await page.evaluate(() => window.talkline.state === "live");
  // One full turn: the question transcribed, the reply spoken and its turn event back.
  await page.waitForFunction(() => window.talkline.turns.length > 0 || window.talkline.error, null, {
    timeout: 90_000,
  });
  Object.assign(
    result,
    await page.evaluate(() => ({
      finals: window.talkline.finals,
      turns: window.talkline.turns,
      agentPeak: window.talkline.agentPeak,
      error: window.talkline.error,
      v2vText: document.getElementById("v2v").textContent,
      transcriptText: document.getElementById("turns").innerText,
    })),
  );
  result.ok = true;
} catch (e) {
  result.failure = String(e);
  result.error = await page.evaluate(() => window.talkline && window.talkline.error).catch(() => null);
} finally {
  await page.screenshot({ path: join(outDir, "call.png"), fullPage: true }).catch(() => {});
  await page.click("#hangup").catch(() => {});
  result.console = console_;
  await browser.close();
}
console.log(JSON.stringify(result));
