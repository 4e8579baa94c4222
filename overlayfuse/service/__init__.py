"""Mounts run as system services: configs, the systemd unit's glue, journald-friendly logs.

- `config`: ``/etc/overlayfuse/NAME.conf`` (TOML) read, checked key by key, turned into the daemon's
  command line (`load_config`, `plan_mount`, `daemon_args`);
- `run`: ``overlayctl service run``: check, claim a container if the config names one, exec the daemon;
- `install`: ``overlayctl service install``: the unit and an example config where systemd looks;
- `journal`: ``<N>`` priority prefixes on stderr when journald reads it.

Plain synchronous code: nothing here imports pyfuse3.
"""
