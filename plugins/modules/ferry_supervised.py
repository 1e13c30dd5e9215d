#!/usr/bin/python
"""Ansible module: a Ferry daemon under ferry-supervise, for hosts without systemd."""

from __future__ import annotations

DOCUMENTATION = r"""
module: ferry_supervised
short_description: Keep a Ferry daemon running under ferry-supervise (hosts without systemd)
description:
  - Starts, stops or restarts a command under the C(ferry-supervise) script shipped by the
    C(ferry_daemon) role, which detaches, restarts the command when it dies and stops it on request.
  - With O(state=started), a running daemon whose fingerprint (the command line plus the contents
    of O(watch)) differs from the one it was started with is restarted, so a changed settings
    file, environment file or certificate takes effect without a handler.
  - Supports check mode and diff mode.
options:
  name: {description: Name of the daemon, used in messages., type: str, required: true}
  state: {description: Desired state., type: str, choices: [started, stopped, restarted], default: started}
  command: {description: The daemon's command line (required unless O(state=stopped))., type: list, elements: str}
  pidfile: {description: The supervisor's state file., type: path, required: true}
  log: {description: Log file (appended)., type: path, default: /dev/null}
  env_file: {description: Environment file (KEY=VALUE lines) for the command., type: path}
  chdir: {description: Working directory of the command., type: path}
  user: {description: Run the command as this user., type: str}
  watch: {description: Files whose contents take part in the fingerprint., type: list, elements: path, default: []}
  supervisor: {description: Path of the ferry-supervise script., type: path, required: true}
  python: {description: Interpreter that runs the script., type: path, default: /usr/bin/python3}
  stop_timeout: {description: Seconds the daemon gets to stop before it is killed., type: int, default: 60}
  config_changed:
    description:
      - Whether this run changed the daemon's files. In check mode nothing was written, so the
        fingerprint cannot tell; this says that a running daemon would be restarted.
    type: bool
    default: false
author: Ferry
"""

EXAMPLES = r"""
- name: Ensure the process server is started.
  ferry.migrate.ferry_supervised:
    name: process-server
    command: [/opt/ferry/venv/bin/python, -m, processserver, --config, /etc/ferry/process-server.toml]
    pidfile: /run/ferry/process-server.pid
    supervisor: /opt/ferry/bin/ferry-supervise
    watch: [/etc/ferry/process-server.toml]
"""

RETURN = r"""
pid: {description: The supervisor's process id., type: int, returned: when running}
child: {description: The daemon's process id., type: int, returned: when running}
restarts: {description: How often the supervisor restarted the daemon., type: int, returned: when running}
fingerprint: {description: Fingerprint of what runs., type: str, returned: always}
"""

import hashlib
import json
import os

from ansible.module_utils.basic import AnsibleModule


def fingerprint(params):
    h = hashlib.sha256(json.dumps([params["command"], params["env_file"], params["user"],
                                   params["chdir"]]).encode())  # fmt: skip
    for path in params["watch"]:
        try:
            with open(path, "rb") as f:
                h.update(f.read())
        except OSError:
            h.update(b"<absent>")
    return h.hexdigest()


def supervise(module, action, extra=()):
    p = module.params
    args = [p["python"], p["supervisor"], action, "--pidfile", p["pidfile"],
            "--stop-timeout", str(p["stop_timeout"])] + list(extra)  # fmt: skip
    rc, out, err = module.run_command(args)
    if rc != 0:
        module.fail_json(msg=f"ferry-supervise {action} failed for {p['name']}: {err.strip() or out.strip()}")
    return json.loads(out.strip().splitlines()[-1])


def start_args(p, mark):
    args = ["--log", p["log"], "--fingerprint", mark]
    for option in ("env_file", "chdir", "user"):
        if p[option]:
            args += ["--" + option.replace("_", "-"), p[option]]
    return args + ["--"] + p["command"]


def main():
    module = AnsibleModule(
        argument_spec=dict(
            name=dict(type="str", required=True),
            state=dict(type="str", default="started", choices=["started", "stopped", "restarted"]),
            command=dict(type="list", elements="str"),
            pidfile=dict(type="path", required=True),
            log=dict(type="path", default="/dev/null"),
            env_file=dict(type="path"),
            chdir=dict(type="path"),
            user=dict(type="str"),
            watch=dict(type="list", elements="path", default=[]),
            supervisor=dict(type="path", required=True),
            python=dict(type="path", default="/usr/bin/python3"),
            stop_timeout=dict(type="int", default=60),
            config_changed=dict(type="bool", default=False),
        ),
        required_if=[("state", "started", ["command"]), ("state", "restarted", ["command"])],
        supports_check_mode=True,
    )
    p = module.params
    mark = fingerprint(p) if p["command"] else ""
    running = {}
    if os.path.exists(p["supervisor"]):
        running = supervise(module, "status")
    elif not module.check_mode and p["state"] != "stopped":
        module.fail_json(msg=f"{p['supervisor']} does not exist; the install phase ships it")
    is_running = bool(running.get("running"))
    stale = is_running and (
        running.get("fingerprint") != mark or (module.check_mode and p["config_changed"])
    )
    if p["state"] == "stopped":
        do_stop, do_start = is_running, False
    elif p["state"] == "restarted":
        do_stop, do_start = is_running, True
    else:
        do_stop, do_start = stale, stale or not is_running
    changed = do_stop or do_start
    before = "running" if is_running else "stopped"
    after = "stopped" if p["state"] == "stopped" else "running"
    if stale and p["state"] == "started":
        before += " (settings changed since start)"
    result = dict(changed=changed, name=p["name"], fingerprint=mark,
                  diff=dict(before=f"{p['name']}: {before}\n", after=f"{p['name']}: {after}\n"))  # fmt: skip
    if module.check_mode or not changed:
        result.update({k: running.get(k) for k in ("pid", "child", "restarts") if running.get(k)})
        module.exit_json(**result)
    if do_stop:
        supervise(module, "stop")
    if do_start:
        os.makedirs(os.path.dirname(p["pidfile"]), exist_ok=True)
        started = supervise(module, "start", start_args(p, mark))
        result.update({k: started.get(k) for k in ("pid", "child", "restarts")})
    module.exit_json(**result)


if __name__ == "__main__":
    main()
