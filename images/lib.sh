# Shared by the image builds (images/*/build.sh, tests/fresh_machine): a Debian root made with
# debootstrap reaches exactly the package registries the build host reaches.

# The first non-security Debian mirror of SUITE the host itself uses (deb822 sources or
# sources.list).
host_mirror() {
  local suite=$1 f uri=""
  for f in /etc/apt/sources.list.d/*.sources; do
    [[ -e $f ]] || continue
    uri=$(awk '
      /^[[:space:]]*$/ { if (u != "" && s !~ /security/ && s ~ /'"$suite"'/) { print u; exit } u = ""; s = "" }
      /^URIs:/ { u = $2 } /^Suites:/ { s = $0 }
      END { if (u != "" && s !~ /security/ && s ~ /'"$suite"'/) print u }' "$f" | head -n1)
    [[ -n $uri ]] && { echo "$uri"; return; }
  done
  if [[ -e /etc/apt/sources.list ]]; then
    uri=$(awk '$1 == "deb" && $3 == "'"$suite"'" { print $2; exit }' /etc/apt/sources.list)
    [[ -n $uri ]] && { echo "$uri"; return; }
  fi
  echo "no $suite mirror found in the host's apt sources" >&2
  return 1
}

# Copies the host's apt sources, the apt settings that make apt reach the mirror (e.g.
# Check-Valid-Until on a snapshot mirror), its CA bundle and local CAs and pip config into ROOT.
# With SUITE (e.g. trixie on a bookworm host) the sources name that suite instead of the host's
# (bookworm-updates becomes trixie-updates, bookworm-security trixie-security).
copy_host_sources() {
  local root=$1 suite=${2:-} f host_suite
  host_suite=$(. /etc/os-release && echo "${VERSION_CODENAME:-}")
  rm -f "$root/etc/apt/sources.list"
  for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list; do
    [[ -e $f ]] || continue
    cp "$f" "$root$f"
    if [[ -n $suite && -n $host_suite && $suite != "$host_suite" ]]; then
      sed -i -E "s/\b$host_suite(-updates|-security)?\b/$suite\1/g" "$root$f"
    fi
  done
  for f in /etc/apt/apt.conf.d/*; do
    [[ -f $f ]] && grep -q '^[[:space:]]*Acquire::' "$f" && cp "$f" "$root/etc/apt/apt.conf.d/"
  done
  if [[ -e /etc/ssl/certs/ca-certificates.crt ]]; then
    mkdir -p "$root/etc/ssl/certs" && cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/"
  fi
  # The host's own CAs too, so that the bundle keeps them when ca-certificates rebuilds it.
  if [[ -d /usr/local/share/ca-certificates ]]; then
    mkdir -p "$root/usr/local/share/ca-certificates"
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  [[ -e /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"
  return 0
}
