#!/usr/bin/env bash
# Install gpu-manager as a service: a venv in PREFIX, the config dir, the state dir, and the
# systemd unit (Linux) or the launchd plist (macOS).
#   sudo deploy/install.sh            install or upgrade
#   sudo deploy/install.sh uninstall  remove the service and the venv (config and state stay)
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
PREFIX=${PREFIX:-/opt/gpu-manager}
ACTION=${1:-install}

if [ "$(uname)" = Darwin ]; then
  CONF=/usr/local/etc/gpu-manager; STATE=/usr/local/var/gpu-manager
  PLIST=/Library/LaunchDaemons/com.gpu-manager.daemon.plist
else
  CONF=/etc/gpu-manager; STATE=/var/lib/gpu-manager
  UNIT=/etc/systemd/system/gpu-manager.service
fi

uninstall() {
  if [ "$(uname)" = Darwin ]; then
    launchctl bootout system "$PLIST" 2>/dev/null || true
    rm -f "$PLIST"
  else
    systemctl disable --now gpu-manager.service 2>/dev/null || true
    rm -f "$UNIT"
    systemctl daemon-reload 2>/dev/null || true
  fi
  rm -rf "$PREFIX"
  echo "removed the service and $PREFIX; kept $CONF and $STATE"
}

install() {
  python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "Python >= 3.11 is required" >&2; exit 1; }
  mkdir -p "$PREFIX" "$CONF" "$STATE"
  python3 -m venv "$PREFIX/.venv"
  "$PREFIX/.venv/bin/pip" install -q --upgrade "$SRC"
  for f in services.yaml phases.yaml; do
    [ -f "$CONF/$f" ] || cp "$SRC/examples/$f" "$CONF/$f"   # never overwrite a live config
  done
  "$PREFIX/.venv/bin/gpu-manager" check-config --config-dir "$CONF"
  if [ "$(uname)" = Darwin ]; then
    cp "$SRC/deploy/com.gpu-manager.daemon.plist" "$PLIST"
    launchctl bootstrap system "$PLIST"
  else
    id gpu-manager >/dev/null 2>&1 || useradd --system --home "$STATE" --shell /usr/sbin/nologin \
      --groups "$(getent group docker >/dev/null && echo docker || echo users)" gpu-manager
    chown -R gpu-manager: "$STATE"
    sed "s#/opt/gpu-manager#$PREFIX#g" "$SRC/deploy/gpu-manager.service" > "$UNIT"
    systemctl daemon-reload
    systemctl enable --now gpu-manager.service
  fi
  echo "installed: config in $CONF, state in $STATE"
}

case "$ACTION" in
  install) install ;;
  uninstall) uninstall ;;
  *) echo "usage: $0 [install|uninstall]" >&2; exit 2 ;;
esac
