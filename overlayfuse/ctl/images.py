"""``overlayctl image ...``: import, ls, inspect, tag, rm, export, save, load, prune.

Parsing and printing only; the work is in `overlayfuse.images` (importer, exporter, store), imported
by the subcommand that needs it: ``image ls`` does not load the importer or the registry client
(see `overlayfuse.ctl`). Every
command that reads the store takes its lock too: it is cheap, it never sees a half-made change, and
it clears what a killed command left in ``tmp/``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import StoreError
from . import registry

if TYPE_CHECKING:
    from ..images.importer import ImportResult
    from ..images.store import ImageRecord, Store

log = logging.getLogger(__name__)

SHORT_ID = 12  # hex digits of an id in tables, as docker shows them


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``image`` and its subcommands to COMMANDS."""
    image = commands.add_parser(
        "image", help="import, pull, push, list, inspect, tag, remove, export, save, load and prune images"
    )
    sub = image.add_subparsers(dest="image_command", metavar="SUBCOMMAND")
    image.set_defaults(handler=lambda args: _usage(image))

    p = sub.add_parser("import", help="import an OCI image layout or a docker save archive",
                       description="Import PATH: an OCI image layout directory (PATH:NAME picks one image of "
                                   "several) or a docker save archive (.tar, .tar.gz).")
    p.add_argument("path", metavar="PATH[:NAME]")
    p.add_argument("--tag", "-t", action="append", metavar="REF",
                   help="tag the image REF (repeatable; default: the names the image carries)")
    p.set_defaults(handler=cmd_import)

    p = sub.add_parser("ls", help="list images")
    p.add_argument("--json", action="store_true", help="print a JSON array")
    p.add_argument("--quiet", "-q", action="store_true", help="print image ids only")
    p.set_defaults(handler=cmd_ls)

    p = sub.add_parser("inspect", help="show an image's details as JSON")
    p.add_argument("refs", nargs="+", metavar="REF", help="a tag, an image id or a unique id prefix")
    p.set_defaults(handler=cmd_inspect)

    p = sub.add_parser("rm", help="untag or remove images; layers go when nothing uses them")
    p.add_argument("refs", nargs="+", metavar="REF")
    p.add_argument("--force", "-f", action="store_true",
                   help="remove even if containers use it or it has several tags")
    p.set_defaults(handler=cmd_rm)

    p = sub.add_parser("export", help="write an image as an OCI image layout")
    p.add_argument("ref", metavar="REF")
    p.add_argument("dest", metavar="DIR", help="a new or empty directory, or an OCI layout to add to")
    p.set_defaults(handler=cmd_export)

    p = sub.add_parser("save", help="write an image as one tar (docker save / OCI archive)",
                       description="Write IMAGE to FILE as a tar that is both an OCI layout and a "
                                   "docker save archive: image load, docker load and skopeo read it.")
    p.add_argument("ref", metavar="IMAGE")
    p.add_argument("-o", "--output", required=True, metavar="FILE", help="the tar to write (replaced if it exists)")
    p.set_defaults(handler=cmd_save)

    p = sub.add_parser("load", help="import an image from a tar (docker save, image save, OCI archive)",
                       description="Import the image in FILE: what image save or docker save wrote, or an "
                                   "OCI layout in a tar. The same as image import FILE.")
    p.add_argument("-i", "--input", required=True, metavar="FILE")
    p.add_argument("--tag", "-t", action="append", metavar="REF", help="tag the image REF (repeatable)")
    p.set_defaults(handler=cmd_load)

    p = sub.add_parser("prune", help="remove untagged images that no container uses",
                       description="Remove the images that have no tag (<none>: left by committing or "
                                   "importing to a tag again) and that no container uses, then the "
                                   "layers and blobs nothing uses any more.")
    p.set_defaults(handler=cmd_prune)

    p = sub.add_parser("tag", help="give an image another name")
    p.add_argument("source", metavar="SRC")
    p.add_argument("target", metavar="NEWREF")
    p.set_defaults(handler=cmd_tag)

    registry.add_transfer_commands(sub)  # image pull, image push (also top-level commands)


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2


# -- import / export / tag --------------------------------------------------------------------------


def cmd_import(args: argparse.Namespace) -> int:
    from ..images.importer import import_image
    from ..images.progress import Progress
    from ..images.refs import parse_reference
    from ..images.store import Store

    tags = [parse_reference(tag) for tag in args.tag or ()]  # a bad tag fails before any work
    with Store.creating(args.root) as store:
        result = import_image(store, args.path, tags, Progress())
    _print_loaded(result)
    return 0


def _print_loaded(result: ImportResult) -> None:
    """docker load's report: the id, and the tags this import gave (not the image's older ones)."""
    print(f"Loaded image ID: {result.image.id}")
    for tag in result.tags:
        print(f"Loaded image: {tag}")
    log.info("%d layers unpacked, %d already in the store", result.new_layers, result.reused_layers)


def cmd_export(args: argparse.Namespace) -> int:
    from ..images.exporter import export_image
    from ..images.refs import resolve_image
    from ..images.store import Store

    store = Store.existing(args.root)
    with store.locked():
        record = resolve_image(store, args.ref)
        tag = _tag_named(args.ref, record)
        result = export_image(store, record, Path(args.dest), tag)
    how = "linked" if result.linked else "copied"
    print(f"Exported {record.id} to {args.dest}" + (f" as {tag}" if tag else "") + f" ({result.blobs} blobs {how})")
    return 0


def cmd_save(args: argparse.Namespace) -> int:
    from ..images.archive import save_image
    from ..images.progress import human_size
    from ..images.refs import resolve_image
    from ..images.store import Store

    store = Store.existing(args.root)
    with store.locked():
        record = resolve_image(store, args.ref)
        tag = _tag_named(args.ref, record)
        size = save_image(store, record, tag, Path(args.output))
    as_tag = f" as {tag}" if tag else ""
    print(f"Saved {record.id} to {args.output}{as_tag} ({human_size(size, binary=False)})")
    return 0


def cmd_load(args: argparse.Namespace) -> int:
    from ..images.importer import import_image
    from ..images.progress import Progress
    from ..images.refs import parse_reference
    from ..images.store import Store

    if not Path(args.input).is_file():
        raise StoreError(f"{args.input}: no such file (image load reads a tar; image import also takes a layout dir)")
    tags = [parse_reference(tag) for tag in args.tag or ()]
    with Store.creating(args.root) as store:
        result = import_image(store, args.input, tags, Progress())
    _print_loaded(result)
    return 0


def cmd_prune(args: argparse.Namespace) -> int:
    from ..images.store import Store

    store = Store.existing(args.root)
    with store.locked():
        used = {container.image for container in store.containers()}
        doomed = [record for record in store.images() if not record.tags and record.id not in used]
        for record in doomed:
            store.delete_image(record.id)
            print(f"Deleted: {record.id}")
        freed = store.collect_garbage()
    for item in freed:
        log.info("freed %s", item)
    print(f"Removed {len(doomed)} image(s)")
    return 0


def _tag_named(text: str, record: ImageRecord) -> str | None:
    """The tag TEXT names if it is one of RECORD's, else its first tag (TEXT was an id)."""
    from ..images.refs import reference_or_none

    wanted = reference_or_none(text)
    if wanted in record.tags:
        return wanted
    return record.tags[0] if record.tags else None


def cmd_tag(args: argparse.Namespace) -> int:
    from ..images.refs import parse_reference, resolve_image
    from ..images.store import Store

    target = parse_reference(args.target)
    store = Store.existing(args.root)
    with store.locked():
        record = resolve_image(store, args.source)
        if target not in record.tags:
            store.install_image(replace(record, tags=(*record.tags, target)))
    return 0


# -- rm -----------------------------------------------------------------------------------------


def cmd_rm(args: argparse.Namespace) -> int:
    from ..images.store import Store

    store = Store.existing(args.root)
    with store.locked():
        for text in args.refs:  # refuse before changing anything: all or nothing
            _remove(store, text, args.force, dry_run=True)
        for text in args.refs:
            _remove(store, text, args.force)
        for item in store.collect_garbage():
            print(f"Deleted: {item}")
    return 0


def _remove(store: Store, text: str, force: bool, dry_run: bool = False) -> None:
    """Untag TEXT if it is one of several tags, else delete the image (docker's rules)."""
    from ..images.refs import reference_or_none, resolve_image

    record = resolve_image(store, text)
    tag = reference_or_none(text)
    if tag in record.tags and len(record.tags) > 1:
        if not dry_run:
            store.save_image(replace(record, tags=tuple(t for t in record.tags if t != tag)))
            print(f"Untagged: {tag}")
        return
    if tag not in record.tags and len(record.tags) > 1 and not force:
        raise StoreError(f"image {record.id[7:7 + SHORT_ID]} is tagged {', '.join(record.tags)}: "
                         "remove it by tag, or use --force")
    users = sorted(c.name for c in store.containers() if c.image == record.id)
    if users and not force:
        raise StoreError(f"image {text} is used by container(s) {', '.join(users)}: remove them first, "
                         "or use --force (the containers keep their layers)")
    if dry_run:
        return
    for name in record.tags:
        print(f"Untagged: {name}")
    store.delete_image(record.id)
    print(f"Deleted: {record.id}")


# -- ls / inspect -------------------------------------------------------------------------------


def _config(store: Store, record: ImageRecord) -> dict[str, Any]:
    try:
        value = store.read_blob_json(record.config)
    except StoreError as exc:
        log.warning("%s", exc)
        return {}
    return value if isinstance(value, dict) else {}


def _layer_sizes(store: Store, diff_ids: list[str]) -> list[int | None]:
    sizes: list[int | None] = []
    for diff_id in diff_ids:
        try:
            sizes.append(store.layer_record(diff_id).size)
        except StoreError:
            sizes.append(None)
    return sizes


def _total(sizes: list[int | None]) -> int | None:
    """The image's unpacked size, or None if a layer's size is unknown (its record is missing)."""
    return None if None in sizes else sum(s for s in sizes if s is not None)


def _since(created: str | None, now: float) -> str:
    """``3 days ago``, as docker's CREATED column says it."""
    if not created:
        return "N/A"
    try:
        then = time.mktime(time.strptime(created[:19], "%Y-%m-%dT%H:%M:%S")) - time.timezone
    except ValueError:
        return created
    seconds = max(0, now - then)
    for unit, length in (("year", 365 * 86400), ("month", 30 * 86400), ("week", 7 * 86400),
                         ("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= length:
            count = int(seconds // length)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "Less than a minute ago"


def _rows(store: Store) -> list[dict[str, Any]]:
    rows = []
    for record in reversed(store.images()):  # newest first
        config = _config(store, record)
        sizes = _layer_sizes(store, list(config.get("rootfs", {}).get("diff_ids", [])))
        size = _total(sizes)
        for tag in record.tags or ("<none>:<none>",):
            repository, _, name = tag.rpartition(":")
            rows.append({"Repository": repository, "Tag": name, "ID": record.id,
                         "Created": config.get("created"), "Size": size})
    return rows


def cmd_ls(args: argparse.Namespace) -> int:
    from ..images.progress import human_size
    from ..images.store import MissingStoreError, Store

    try:
        store = Store.existing(args.root)
    except MissingStoreError as exc:  # nothing to list: say why, as an empty store would not
        print(f"overlayctl: note: {exc}", file=sys.stderr)
        rows = []
    else:
        with store.locked():
            rows = _rows(store)
    if args.json:
        json.dump(rows, sys.stdout, indent=2)
        print()
        return 0
    if args.quiet:
        for image_id in dict.fromkeys(row["ID"] for row in rows):
            print(image_id[7:7 + SHORT_ID])
        return 0
    now = time.time()
    table = [("REPOSITORY", "TAG", "IMAGE ID", "CREATED", "SIZE")]
    for row in rows:
        size = "?" if row["Size"] is None else human_size(row["Size"], binary=False)
        table.append((row["Repository"], row["Tag"], row["ID"][7:7 + SHORT_ID], _since(row["Created"], now), size))
    widths = [max(len(line[n]) for line in table) for n in range(len(table[0]) - 1)]
    for line in table:
        print("   ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=False)) + "   " + line[-1])
    return 0


def describe(store: Store, record: ImageRecord) -> dict[str, Any]:
    """One image as ``docker image inspect`` shows it, plus where each layer is on disk."""
    config = _config(store, record)
    manifest = store.read_blob_json(record.manifest)
    diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
    sizes = _layer_sizes(store, diff_ids)
    blobs = manifest.get("layers", []) if isinstance(manifest, dict) else []
    layers = []
    for n, diff_id in enumerate(diff_ids):
        blob = blobs[n] if n < len(blobs) and isinstance(blobs[n], dict) else {}
        layers.append({
            "DiffID": diff_id,
            "Digest": blob.get("digest"),
            "MediaType": blob.get("mediaType"),
            "Size": blob.get("size"),
            "UnpackedSize": sizes[n],
            "Path": str(store.layer_dir(diff_id)),
        })
    names = dict.fromkeys(tag.rpartition(":")[0] for tag in record.tags)
    return {
        "Id": record.id,
        "RepoTags": list(record.tags),
        "RepoDigests": [f"{name}@{record.manifest}" for name in names],
        "ManifestDigest": record.manifest,
        "Created": config.get("created"),
        "Imported": record.imported,
        "Author": config.get("author", ""),
        "Config": config.get("config") or {},
        "Architecture": config.get("architecture", ""),
        "Os": config.get("os", ""),
        "Size": _total(sizes),
        "RootFS": {"Type": config.get("rootfs", {}).get("type", "layers"), "Layers": diff_ids},
        "Layers": layers,
        "History": config.get("history", []),
    } | ({"Variant": config["variant"]} if config.get("variant") else {})


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..images.refs import resolve_image
    from ..images.store import Store

    store = Store.existing(args.root)
    with store.locked():
        described = [describe(store, resolve_image(store, ref)) for ref in args.refs]
    json.dump(described, sys.stdout, indent=2)
    print()
    return 0
