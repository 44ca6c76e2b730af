"""Data backends of fastrsb, one per file, writer beside reader (installed as `fastrsb.loaders`).

What `fastrsb convert SRC OUT` writes (layout format 2; `layout.py` is the one module that knows
these paths and reads and writes the per-sample table)::

    OUT/classes.json                 JSON list of class-folder names; label = position in the list
    OUT/<split>/manifest.json        counts, kept / re-encoded / rejected / skipped files, options,
                                     versions, sha256 of every file, and a checksum over itself
    OUT/<split>/samples.jsonl        one JSON line per written sample, in beton / shard order: index,
                                     key, label, height, width, shard file, source path (any bytes,
                                     lossless), stored (kept or re-encoded), why, source sha256
    OUT/<split>/<split>.beton        FFCV: fields 'image' (RGBImageField) and 'label' (IntField)
    OUT/<split>/wds/<split>-NNNNNN.tar   webdataset shards for DALI's fn.readers.webdataset:
                                     per sample `<key>.jpg` (JPEG) and `<key>.cls` (ASCII decimal label)
    OUT/<split>/wds/<split>-NNNNNN.idx   DALI's index for that shard (wds2idx format, v1.2)
    OUT/<split>/.convert-state.json  resume state: fingerprint of sources and options, formats made

A JPEG that every backend decodes as it is keeps the source's bytes (val always, train within
--max-side); others are re-encoded, and samples.jsonl says why.

Sample order: the train split is shuffled once with a fixed seed (shards then mix classes, which a
streaming reader needs), the val split keeps sorted (class, file name) order. Beton index i is the
i-th sample of the concatenated shards, so both formats hold the same samples in the same order,
and in the default `jpg` write mode the very same JPEG bytes. Keys are 9-digit sample numbers.

Modules: `loader` (the contract: `make_loader`, `Loader`), `auto` (which backend, measured), `registry`
(backends register themselves), `layout` (the on-disk layout: paths, the sample table, manifests,
ShardIndex), `source` (the one scan of a source ImageFolder split), `sampling` (the IndexPlan and the
seeded crops: `read_box`), `wds` / `beton` (formats: writers and readers), one module per backend: `ffcv_loader`,
`dali_loader`, `imagefolder` (PIL, the reference).
"""

if __name__ != "fastrsb.loaders":  # one package, one name: a second copy would hold its own registries
    raise ImportError("import this folder as fastrsb.loaders (for example `from fastrsb.loaders import make_loader`), "
                      f"not as {__name__!r}: see fastrsb/__init__.py")

from .loader import Loader, make_loader  # noqa: E402  (the public contract)

