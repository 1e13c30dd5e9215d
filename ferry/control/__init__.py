"""The daemons' side of the configuration server's API (docs/api.md).

A component registers once with a one-time passphrase
(:func:`~ferry.control.client.register`, :func:`~ferry.control.client.register_and_save`)
and keeps the answer in a credentials file::

    {"server": "https://ferry-cs.example.net", "tenant": "demo",
     "component_id": "ag-web01", "token": "c.demo.ag-web01.…", "ca": "/etc/ferry/cs-ca.pem"}

(mode 0600; ``ca`` is optional and names the CA that the server's TLS
certificate must chain to, else the system's trust store is used).  From
then on a :class:`~ferry.control.client.Client` fetches the component's
settings and its storage grant, sends heartbeats, reports disks, recovery
points and the outcome of commands.

The modules, each one concern:

=================  =================================================================
``defaults``       tunables, each with its unit
``errors``         ControlRefused (fatal, the server's one line), ControlUnavailable
                   (retryable), ControlUntrusted (TLS failed), CommandFailed,
                   CredentialsInvalid
``credentials``    the credentials file
``transport``      the one HTTP transport (timeouts, retries, secrets kept out of
                   errors), shared by the daemons and the ``ferry`` CLI
``client``         registration and the component's API
``settingsource``  the settings JSON turned into a daemon's settings dataclass
``threads``        what the control threads share (quiet logging, jitter, running)
``heartbeat``      the heartbeat thread
``commands``       the command journal and the command poller
``reporting``      disks, recovery points and component state reported
``daemon``         a daemon in server mode: start-up and the commands all answer
``frame``          the daemons' command-line frame
=================  =================================================================

The token and the passphrase never appear in a log line or an exception.
"""
