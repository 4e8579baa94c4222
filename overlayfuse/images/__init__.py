"""Container images: OCI formats, the blob and layer store, import/export, the registry client.

- `store`, `refs`, `remove`, `space`, `usage`: the store on disk, image references, removal, disk use;
- `oci`, `sources`: OCI documents parsed and checked; layout dirs and ``docker save`` archives;
- `compression`, `unpack`, `extract`, `inherit`, `limits`: one layer blob streamed, verified and
  extracted safely;
- `importer`, `exporter`, `progress`, `recompress`, `archive`: import and export;
- `registry`: pull, push and login over the OCI distribution API.

May import `overlayfuse.overlay` (the whiteout forms) and `overlayfuse.linux`; never `daemon`,
`containers`, `service` or `ctl`. Plain synchronous code: nothing here imports pyfuse3.
"""
