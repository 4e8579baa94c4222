"""Containers on images: create, mount (a daemon per container), diff, commit.

- `lifecycle`: container records, their daemons (started, found, stopped), states, removal;
- `changes`: the A/C/D list of an upper dir (``overlayctl diff``);
- `layertar`, `sparse`, `indexlinks`: an upper dir written as an OCI layer tar (whiteouts, sparse
  files, hardlinks kept through the copy-up index);
- `commit`: the frozen upper dir turned into a layer and a new image in the store.

May import `overlayfuse.images`, `overlayfuse.daemon` (options, the control socket's client),
`overlayfuse.overlay` and `overlayfuse.linux`; `images` never imports this package. Plain
synchronous code: nothing here imports pyfuse3.
"""
