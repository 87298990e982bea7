"""The Pod Security Standards "restricted" profile as pure functions over a pod template.

No checker for the Pod Security Standards installs from PyPI (the real one is the apiserver's
Go admission plugin, k8s.io/pod-security-admission), so this is a transcription of its
`policy/check_*.go` at the newest policy version: each function below is named after the
upstream check ID and follows that file's rules (baseline checks are part of "restricted").
The user-namespace relaxation of runAsNonRoot/runAsUser (1.35, `hostUsers: false`) is left out:
workers never set it, and without it the checks are stricter, not looser.

Each check returns None (allowed) or the reason, as the admission plugin's ForbiddenDetail.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

Pod = dict[str, Any]  # {"metadata": ..., "spec": ...}
Check = Callable[[dict[str, Any], dict[str, Any]], str | None]

_CAPS_BASELINE = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
_SYSCTLS = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
    "net.ipv4.tcp_rmem",
    "net.ipv4.tcp_wmem",
    "net.ipv4.tcp_slow_start_after_idle",
    "net.ipv4.tcp_notsent_lowat",
}  # fmt: skip  (sysctlsAllowedV1Dot37)
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
    "projected", "secret",
}  # fmt: skip
_APPARMOR_ANNOTATION = "container.apparmor.security.beta.kubernetes.io/"


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """visitContainers: init, regular and ephemeral containers."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _ctx(container: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = container.get("securityContext") or {}
    return ctx


def _pod_ctx(spec: dict[str, Any]) -> dict[str, Any]:
    ctx: dict[str, Any] = spec.get("securityContext") or {}
    return ctx


def _bad(names: list[str], what: str) -> str | None:
    return f"{', '.join(names)}: {what}" if names else None


# --- baseline -------------------------------------------------------------------------------


def windowsHostProcess(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        c["name"]
        for c in containers(spec)
        if (_ctx(c).get("windowsOptions") or {}).get("hostProcess") is True
    ]
    if (_pod_ctx(spec).get("windowsOptions") or {}).get("hostProcess") is True:
        bad.append("pod")
    return _bad(bad, "hostProcess must not be true")


def hostNamespaces(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [k for k in ("hostNetwork", "hostPID", "hostIPC") if spec.get(k) is True]
    return _bad(bad, "host namespaces must not be shared")


def privileged(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [c["name"] for c in containers(spec) if _ctx(c).get("privileged") is True]
    return _bad(bad, "securityContext.privileged must not be true")


def capabilities_baseline(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        c["name"]
        for c in containers(spec)
        if set((_ctx(c).get("capabilities") or {}).get("add") or []) - _CAPS_BASELINE
    ]
    return _bad(bad, "adds capabilities beyond the baseline set")


def hostPathVolumes(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [v["name"] for v in spec.get("volumes") or [] if "hostPath" in v]
    return _bad(bad, "hostPath volumes are forbidden")


def hostPorts(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        c["name"] for c in containers(spec) if any(p.get("hostPort") for p in c.get("ports") or [])
    ]
    return _bad(bad, "hostPort must be unset or 0")


def appArmorProfile(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    def bad_type(profile: dict[str, Any] | None) -> bool:
        return profile is not None and profile.get("type") not in ("RuntimeDefault", "Localhost")

    bad = [c["name"] for c in containers(spec) if bad_type(_ctx(c).get("appArmorProfile"))]
    if bad_type(_pod_ctx(spec).get("appArmorProfile")):
        bad.append("pod")
    for key, value in (meta.get("annotations") or {}).items():
        allowed = value in ("", "runtime/default") or value.startswith("localhost/")
        if key.startswith(_APPARMOR_ANNOTATION) and not allowed:
            bad.append(f"annotation {key}")
    return _bad(bad, "AppArmor profile must be RuntimeDefault or Localhost")


def seLinuxOptions(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    def bad(opts: dict[str, Any] | None) -> bool:
        if not opts:
            return False
        return opts.get("type", "") not in _SELINUX_TYPES or bool(
            opts.get("user") or opts.get("role")
        )

    names = [c["name"] for c in containers(spec) if bad(_ctx(c).get("seLinuxOptions"))]
    if bad(_pod_ctx(spec).get("seLinuxOptions")):
        names.append("pod")
    return _bad(names, "seLinuxOptions type, user or role not allowed")


def procMount(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    """procMount (baseline) and procMount_restricted: only the Default proc mount."""
    bad = [c["name"] for c in containers(spec) if _ctx(c).get("procMount") not in (None, "Default")]
    return _bad(bad, "procMount must be Default")


def seccompProfile_baseline(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        c["name"]
        for c in containers(spec)
        if (_ctx(c).get("seccompProfile") or {}).get("type") == "Unconfined"
    ]
    if (_pod_ctx(spec).get("seccompProfile") or {}).get("type") == "Unconfined":
        bad.append("pod")
    return _bad(bad, "seccompProfile must not be Unconfined")


def sysctls(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [s["name"] for s in _pod_ctx(spec).get("sysctls") or [] if s["name"] not in _SYSCTLS]
    return _bad(bad, "unsafe sysctls")


def hostProbesAndHostLifecycle(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    def handlers(c: dict[str, Any]) -> Iterator[dict[str, Any]]:
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            yield c.get(probe) or {}
        for hook in ("postStart", "preStop"):
            yield (c.get("lifecycle") or {}).get(hook) or {}

    bad = [
        c["name"]
        for c in containers(spec)
        for h in handlers(c)
        if any((h.get(k) or {}).get("host") for k in ("httpGet", "tcpSocket"))
    ]
    return _bad(bad, "probe and lifecycle handlers must not set host")


# --- restricted -----------------------------------------------------------------------------


def restrictedVolumes(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        v["name"]
        for v in spec.get("volumes") or []
        if not (set(v) - {"name"}) <= _RESTRICTED_VOLUMES
    ]
    return _bad(bad, f"volume types other than {sorted(_RESTRICTED_VOLUMES)}")


def allowPrivilegeEscalation(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [
        c["name"] for c in containers(spec) if _ctx(c).get("allowPrivilegeEscalation") is not False
    ]
    return _bad(bad, "must set securityContext.allowPrivilegeEscalation=false")


def runAsNonRoot(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    pod = _pod_ctx(spec).get("runAsNonRoot")
    bad = ["pod"] if pod is False else []
    for c in containers(spec):
        own = _ctx(c).get("runAsNonRoot")
        if own is False or (own is None and pod is not True):
            bad.append(c["name"])
    return _bad(bad, "pod or containers must set securityContext.runAsNonRoot=true")


def runAsUser(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    bad = [c["name"] for c in containers(spec) if _ctx(c).get("runAsUser") == 0]
    if _pod_ctx(spec).get("runAsUser") == 0:
        bad.append("pod")
    return _bad(bad, "must not set runAsUser=0")


def seccompProfile_restricted(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if (spec.get("os") or {}).get("name") == "windows":
        return None
    ok = ("RuntimeDefault", "Localhost")
    pod = (_pod_ctx(spec).get("seccompProfile") or {}).get("type")
    bad = ["pod"] if pod is not None and pod not in ok else []
    for c in containers(spec):
        own = (_ctx(c).get("seccompProfile") or {}).get("type")
        if (own is not None and own not in ok) or (own is None and pod not in ok):
            bad.append(c["name"])
    return _bad(
        bad, 'must set securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"'
    )


def capabilities_restricted(meta: dict[str, Any], spec: dict[str, Any]) -> str | None:
    if (spec.get("os") or {}).get("name") == "windows":
        return None
    bad = []
    for c in containers(spec):
        caps = _ctx(c).get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []) or set(caps.get("add") or []) - {
            "NET_BIND_SERVICE"
        }:
            bad.append(c["name"])
    return _bad(bad, 'must drop "ALL" capabilities and add at most NET_BIND_SERVICE')


BASELINE: tuple[Check, ...] = (
    windowsHostProcess, hostNamespaces, privileged, capabilities_baseline, hostPathVolumes,
    hostPorts, appArmorProfile, seLinuxOptions, procMount, seccompProfile_baseline, sysctls,
    hostProbesAndHostLifecycle,
)  # fmt: skip
RESTRICTED: tuple[Check, ...] = (
    *BASELINE, restrictedVolumes, allowPrivilegeEscalation, runAsNonRoot, runAsUser,
    seccompProfile_restricted, capabilities_restricted,
)  # fmt: skip


def violations(template: Pod, checks: tuple[Check, ...] = RESTRICTED) -> dict[str, str]:
    """check ID -> reason, for every check of the profile a pod template fails."""
    meta, spec = template.get("metadata") or {}, template["spec"]
    out = {}
    for check in checks:
        reason = check(meta, spec)
        if reason is not None:
            out[check.__name__] = reason
    return out
