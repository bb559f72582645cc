#!/usr/bin/env bash
# Re-fetches the vendored browser libraries of the web app from npm (`npm pack`, no
# install) into assets/vendor/, with the only two edits they get (see VENDORED.md).
# Run by hand when upgrading a library; the build never runs it (no Node needed).
# Afterwards update the versions in VENDORED.md and run the browser tests.
set -euo pipefail
cd "$(dirname "$0")"
out="$PWD/assets/vendor"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cd "$tmp"
fetch() { npm pack --silent "$1" >/dev/null && mkdir -p "$2" && tar xzf ./*.tgz -C "$2" && rm ./*.tgz; }
fetch preact@11.2.0 preact
fetch htm@3.1.1 htm
fetch marked@18.3.0 marked
fetch dompurify@3.5.0 dompurify
fetch eventsource-parser@3.1.1 esp
cp preact/package/dist/preact.mjs "$out/preact.mjs"
# hooks imports the bare specifier "preact"; a page without an import map (which CSP
# would count as inline script) needs a relative path.
sed 's/from"preact"/from".\/preact.mjs"/' preact/package/hooks/dist/hooks.mjs >"$out/preact-hooks.mjs"
cp htm/package/dist/htm.module.js "$out/htm.mjs"
cp marked/package/lib/marked.esm.js "$out/marked.mjs"
cp dompurify/package/dist/purify.es.mjs "$out/purify.mjs"
cp esp/package/dist/index.js "$out/eventsource-parser.mjs"
# Source maps are not shipped, so their comments would only make DevTools ask for them.
sed -i '/^\/\/# sourceMappingURL=/d' "$out"/*.mjs
cp preact/package/LICENSE "$out/licenses/preact.txt"
cp htm/package/LICENSE "$out/licenses/htm.txt"
cp marked/package/LICENSE "$out/licenses/marked.txt"
cp dompurify/package/LICENSE "$out/licenses/dompurify.txt"
cp esp/package/LICENSE "$out/licenses/eventsource-parser.txt"
(cd "$out" && sha256sum ./*.mjs)
