#!/usr/bin/env bash
# Vendor NiiVue (BSD-2-Clause) for the participant report's viewer, reproducibly.
#
# Fetches the pinned npm release with npm (which checks the tarball against the registry's sha512
# integrity), checks that integrity again here, copies its classic-script (UMD) build
# dist/niivue.umd.js to bids_app/data/viewer/niivue-<version>.umd.js and records version, tarball,
# integrity and the sha256 of the copied file in bids_app/data/viewer/VENDOR.json. The licence text
# is bids_app/data/viewer/LICENSE_NiiVue.txt (see docs/niivue_licence.md).
#
# Usage: scripts/vendor_niivue.sh            (re-vendor the pinned version and check it is unchanged)
#        NIIVUE_VERSION=0.70.0 NIIVUE_INTEGRITY=sha512-... scripts/vendor_niivue.sh   (move the pin)
set -euo pipefail

VERSION="${NIIVUE_VERSION:-0.69.0}"
INTEGRITY="${NIIVUE_INTEGRITY:-sha512-YMjQvJgD1W2b7DuoxkwlC4VxbrgIePRJ5qyQzXKxi2v2MBVg285P/CIQyg46oDDGDIcaNlbd+MhtO/edMbXJkA==}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEST="$ROOT/bids_app/data/viewer"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT

cd "$TMP"
npm pack "@niivue/niivue@${VERSION}" --silent > pack.txt
TARBALL="$(tail -n 1 pack.txt)"
GOT="sha512-$(openssl dgst -sha512 -binary "$TARBALL" | base64 -w0)"
if [[ "$GOT" != "$INTEGRITY" ]]; then
  echo "vendor_niivue.sh: $TARBALL has integrity $GOT, expected $INTEGRITY" >&2
  exit 1
fi
tar -xzf "$TARBALL" package/dist/niivue.umd.js package/package.json
LICENSE="$(node -e 'console.log(require("./package/package.json").license)')"
if [[ "$LICENSE" != "BSD-2-Clause" ]]; then
  echo "vendor_niivue.sh: the package's licence is $LICENSE, not BSD-2-Clause: review docs/niivue_licence.md" >&2
  exit 1
fi

mkdir -p "$DEST"
OUT="$DEST/niivue-${VERSION}.umd.js"
cp package/dist/niivue.umd.js "$OUT.tmp" && mv "$OUT.tmp" "$OUT"
SHA256="$(sha256sum "$OUT" | cut -d' ' -f1)"
for old in "$DEST"/niivue-*.umd.js; do
  [[ "$old" == "$OUT" ]] || rm -f "$old"
done
cat > "$DEST/VENDOR.json.tmp" <<JSON
{
  "name": "@niivue/niivue",
  "version": "${VERSION}",
  "license": "${LICENSE}",
  "file": "niivue-${VERSION}.umd.js",
  "source": "dist/niivue.umd.js of https://registry.npmjs.org/@niivue/niivue/-/niivue-${VERSION}.tgz",
  "tarball_integrity": "${INTEGRITY}",
  "sha256": "${SHA256}",
  "vendored_by": "scripts/vendor_niivue.sh"
}
JSON
mv "$DEST/VENDOR.json.tmp" "$DEST/VENDOR.json"
echo "NiiVue ${VERSION}: $OUT (sha256 ${SHA256})"
