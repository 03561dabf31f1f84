# Shared helpers of the guest-images scripts (sourced, not run).
# Everything built is cached outside the work tree, in $THINVM_CACHE
# (default: ${XDG_CACHE_HOME:-$HOME/.cache}/thinvm), keyed by its inputs.

THINVM_CACHE=${THINVM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/thinvm}
GUEST_IMAGES_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO_DIR=$(cd "$GUEST_IMAGES_DIR/.." && pwd)
mkdir -p "$THINVM_CACHE/debs"

say() { printf 'thinvm-images: %s\n' "$*" >&2; }
die() { printf 'thinvm-images: error: %s\n' "$*" >&2; exit 1; }
# The median of the numbers on stdin, one per line; what is not a number (a run that
# reported nothing: "nan", "") is left out; with an even count, the mean of the middle two
# (not the lower one, which would favour whichever side lost a run). "nan" if none.
median() {
  { grep -E '^-?[0-9]+([.][0-9]+)?$' || true; } | sort -g | awk '{ v[NR] = $1 }
    END { if (!NR) print "nan"; else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.1f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'
}

# Installs missing Debian packages the scripts need (via scripts/install-deps).
need_deps() {
  "$REPO_DIR/scripts/install-deps" >&2 || die "installing Debian packages failed"
}

# The versioned package a metapackage depends on, e.g. linux-image-amd64 -> linux-image-6.1.0-56-amd64.
resolve_meta() {
  apt-cache depends "$1" 2>/dev/null | awk -v p="$2" '$1 == "Depends:" && $2 ~ p { print $2; exit }'
}

# Downloads a package's .deb into the cache (no installation); prints its path.
fetch_deb() {
  local pkg=$1 deb
  deb=$(ls "$THINVM_CACHE/debs/${pkg}_"*.deb 2>/dev/null | head -1 || true)
  if [ -z "$deb" ]; then
    say "downloading $pkg (apt-get download)"
    (cd "$THINVM_CACHE/debs" && apt-get download -q "$pkg" >&2 2>/dev/null) ||
      { apt-get update -q >&2 && (cd "$THINVM_CACHE/debs" && apt-get download -q "$pkg" >&2); } ||
      die "cannot download Debian package $pkg"
    deb=$(ls "$THINVM_CACHE/debs/${pkg}_"*.deb | head -1)
  fi
  printf '%s\n' "$deb"
}

# Extracts a .deb once into a cache directory; prints the directory.
extract_deb() {
  local deb=$1 dir
  dir="$THINVM_CACHE/extract/$(basename "$deb" .deb)"
  if [ ! -f "$dir/.done" ]; then
    say "extracting $(basename "$deb")"
    rm -rf "$dir" && mkdir -p "$dir"
    dpkg-deb -x "$deb" "$dir" || die "cannot extract $deb"
    touch "$dir/.done"
  fi
  printf '%s\n' "$dir"
}

# sha256 of files and strings, for cache keys.
key_of() {
  { for x in "$@"; do if [ -f "$x" ]; then cat "$x"; else printf '%s' "$x"; fi; done; } |
    sha256sum | cut -c1-16
}
