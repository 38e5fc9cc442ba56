// Generates clients/web/src/gen/** (TypeScript, protoc-gen-es) from protos/, offline.
// Usage: node gen.mjs [--check]
//   --check  generate into a temporary folder and fail when the committed tree differs
//            (missing, extra or changed files), like `protos/generate.py --check`.
// Runs buf (pinned in the root package.json) from the repository root with this folder's
// buf.gen.yaml, whose plugin is the protoc-gen-es pinned in this folder's package.json.
import { spawnSync } from "node:child_process";
import { cpSync, existsSync, mkdtempSync, readdirSync, readFileSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, relative, resolve } from "node:path";
import { fileURLToPath } from "node:url";

const here = dirname(fileURLToPath(import.meta.url));
const root = resolve(here, "..", "..");
const committed = join(here, "src", "gen");
const buf = join(root, "node_modules", ".bin", "buf");
const plugin = join(here, "node_modules", ".bin", "protoc-gen-es");
// Everything under protos/kiln, plus the error detail types the page decodes (BadRequest,
// RetryInfo, ErrorInfo); include_imports brings in what those import.
const INPUTS = ["protos/kiln", "protos/third_party/googleapis/google/rpc/error_details.proto"];

for (const [path, fix] of [
  [buf, "run `make setup` (npm ci at the repository root)"],
  [plugin, "run `make web` (npm ci in clients/web)"],
]) {
  if (!existsSync(path)) {
    console.error(`${relative(root, path)} is missing; ${fix}`);
    process.exit(1);
  }
}

function files(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir, { recursive: true })
    .map((name) => join(dir, name))
    .filter((path) => statSync(path).isFile())
    .map((path) => relative(dir, path))
    .sort();
}

const scratch = mkdtempSync(join(tmpdir(), "kiln-web-gen-"));
try {
  const args = ["generate", "--template", "clients/web/buf.gen.yaml", "--output", scratch];
  for (const input of INPUTS) args.push("--path", input);
  const run = spawnSync(buf, args, { cwd: root, stdio: "inherit" });
  if (run.status !== 0) process.exit(run.status ?? 1);
  const fresh = join(scratch, "src", "gen");

  if (process.argv.includes("--check")) {
    const want = files(fresh);
    const have = files(committed);
    const diffs = [
      ...want.filter((f) => !have.includes(f)).map((f) => `missing: ${f}`),
      ...have.filter((f) => !want.includes(f)).map((f) => `extra: ${f}`),
      ...want
        .filter((f) => have.includes(f) && !readFileSync(join(fresh, f)).equals(readFileSync(join(committed, f))))
        .map((f) => `changed: ${f}`),
    ];
    if (diffs.length) {
      console.error(`Generated TypeScript in clients/web/src/gen is stale; run \`make gen\` and commit:\n  ${diffs.join("\n  ")}`);
      process.exit(1);
    }
    console.log("Generated TypeScript is up to date.");
  } else {
    rmSync(committed, { recursive: true, force: true });
    cpSync(fresh, committed, { recursive: true });
    console.log(`Wrote ${relative(root, committed)} (${files(committed).length} files)`);
  }
} finally {
  rmSync(scratch, { recursive: true, force: true });
}
