"""The child side of `posttrain.rewards.sandbox`: the bootstrap every sandboxed interpreter runs first.

`_bootstrap` is never called in this process: `posttrain.rewards.sandbox` ships its source (with
`inspect.getsource`) to a fresh `python -I -S -c`, so it must stay self-contained (standard library
only, imported inside). It reads its setup (JSON) from the pipe given as argv[1]; in `full` mode it
hides the host's directories behind read-only tmpfs mounts, mounts a private /tmp, drops every
capability and switches to a fresh uid/gid with no_new_privs; then it forks an init that waits
for the program, lowers the rlimits, and runs the runner source as `__main__` (with `PAYLOAD`).
"""

def _bootstrap():  # pragma: no cover - runs inside the sandbox; shipped as source via `-c`
    import json
    import os
    import sys

    fd = int(sys.argv[1])
    cfg = json.loads(b"".join(iter(lambda: os.read(fd, 1 << 16), b"")))
    os.close(fd)
    full = cfg.get("full")
    if full is not None:  # root inside fresh namespaces: hide the host, then drop to a fresh uid
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)

        def _ok(ret, what):
            if ret != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), what)

        def mount(src, dst, fstype, flags, data):
            _ok(libc.mount(src.encode(), dst.encode(), fstype.encode() if fstype else None,
                           ctypes.c_ulong(flags), data.encode() if data else None), dst)

        ro, nosuid, nodev, bind = 1, 2, 4, 4096
        uid = full["uid"]
        for d in full["hide_dirs"]:
            mount("none", d, "tmpfs", ro | nosuid | nodev, "size=16k,mode=755")
        for f in full["hide_files"]:
            mount("/dev/null", f, None, bind, None)
        mount("none", "/tmp", "tmpfs", nosuid | nodev,
              "size=%dm,mode=700,uid=%d,gid=%d" % (full["scratch_mb"], uid, uid))
        os.chdir("/tmp")
        for cap in range(64):  # empty the capability bounding set (EINVAL past the last cap)
            if libc.prctl(24, cap, 0, 0, 0) != 0 and cap < 32:
                _ok(-1, "PR_CAPBSET_DROP")
        try:
            os.setgroups([])
        except PermissionError:  # setgroups denied (some user namespaces): fine if there are none
            if os.getgroups():
                raise
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)  # clears all capabilities (and the parent-death signal)
        _ok(libc.prctl(38, 1, 0, 0, 0), "PR_SET_NO_NEW_PRIVS")
        _ok(libc.prctl(1, 9, 0, 0, 0), "PR_SET_PDEATHSIG")
    else:
        os.chdir(cfg["cwd"])
    pid = os.fork()  # an init (pid 1 of the namespace) waits for the program, exits with its status
    if pid:
        _, status = os.waitpid(pid, 0)
        os._exit(os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
    import resource

    for name, soft, hard in cfg["rlimits"]:  # only ever lowered (never above the current hard limit)
        res = getattr(resource, name)
        cur = resource.getrlimit(res)[1]
        hard = hard if cur == resource.RLIM_INFINITY else min(hard, cur)
        resource.setrlimit(res, (min(soft, hard), hard))
    sys.argv = ["main.py"]
    g = {"__name__": "__main__", "__builtins__": __builtins__}
    if cfg["payload"] is not None:
        g["PAYLOAD"] = cfg["payload"]
    exec(compile(cfg.pop("runner"), "main.py", "exec"), g)
