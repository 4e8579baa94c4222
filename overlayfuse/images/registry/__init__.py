"""The registry side of the store: pull, push and login over the OCI distribution API.

``reference`` parses ``host/repo:tag@digest`` the way docker does; ``credentials`` reads and writes
the auth files podman and skopeo share; ``tls`` builds the TLS context from the system CAs and the
``certs.d`` directories; ``client`` is one registry session (ping, Basic or Bearer auth with tokens
cached per scope, retries, redirects); ``pull`` and ``push`` move images. A pull stages a plain OCI
layout and hands it to the importer, so a pulled image is installed exactly as an imported one.
No pyfuse3 here.
"""
