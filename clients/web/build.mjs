// Bundles the page into exactly three static files the gateway serves:
//   dist/index.html  dist/app.js  dist/app.css
// Usage: node build.mjs [--outdir DIR] [--dev]
//   --outdir  write somewhere else (the browser tests build into a temporary folder)
//   --dev     no minification, inline source map (for debugging in a browser)
// No network, no code splitting, no hashed names: the deploy files rely on these three names.
// The HTML references the bundles with a content hash in the query string, so a browser that
// revalidates (Envoy sends `cache-control: no-cache`) never mixes an old script with new HTML.
import { createHash } from "node:crypto";
import { mkdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import * as esbuild from "esbuild";

const here = dirname(fileURLToPath(import.meta.url));
const args = process.argv.slice(2);
const flag = (name) => args.includes(name);
const option = (name, fallback) => {
  const at = args.indexOf(name);
  return at >= 0 && args[at + 1] ? args[at + 1] : fallback;
};
const outdir = resolve(option("--outdir", join(here, "dist")));
const dev = flag("--dev");
const OUTPUTS = ["index.html", "app.js", "app.css"];

mkdirSync(outdir, { recursive: true });
for (const name of [...OUTPUTS, "app.js.map", "app.css.map"]) rmSync(join(outdir, name), { force: true });

const result = await esbuild.build({
  absWorkingDir: here,
  entryPoints: [
    { in: "src/main.ts", out: "app" },
    { in: "src/app.css", out: "app" },
  ],
  outdir,
  bundle: true,
  splitting: false,
  format: "esm",
  target: ["es2022", "chrome110", "firefox115", "safari16"],
  minify: !dev,
  sourcemap: dev ? "inline" : false,
  legalComments: dev ? "inline" : "eof",
  metafile: true,
  logLevel: "warning",
  define: { "process.env.NODE_ENV": dev ? '"development"' : '"production"' },
});

const hash = (name) => createHash("sha256").update(readFileSync(join(outdir, name))).digest("hex").slice(0, 12);
const html = readFileSync(join(here, "src", "index.html"), "utf8")
  .replace('src="app.js"', `src="app.js?v=${hash("app.js")}"`)
  .replace('href="app.css"', `href="app.css?v=${hash("app.css")}"`);
if (!html.includes("app.js?v=") || !html.includes("app.css?v=")) {
  throw new Error("src/index.html must reference app.js and app.css");
}
writeFileSync(join(outdir, "index.html"), html);

const sizes = Object.entries(result.metafile.outputs).map(([file, { bytes }]) => `${file.split("/").pop()} ${(bytes / 1024).toFixed(1)} KiB`);
console.log(`built ${outdir}: index.html ${(html.length / 1024).toFixed(1)} KiB, ${sizes.join(", ")}`);
