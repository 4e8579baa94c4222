"""Mounts run as system services: configs, the systemd unit's glue.

- `config`: ``/etc/overlayfuse/NAME.conf`` (TOML) read, checked key by key, turned into the daemon's
  command line (`load_config`, `plan_mount`, `daemon_args`);
- `run`: ``overlayctl service run``: check, claim a container if the config names one, exec the daemon;
- `install`: ``overlayctl service install``: the unit and an example config where systemd looks.

Plain synchronous code: nothing here imports pyfuse3. The ``<N>`` priority prefixes journald reads on
stderr are `overlayfuse.linux.journal`'s: the daemon uses them too, and never loads this package.
"""
