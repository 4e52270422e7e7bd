"""The raw archive (bronze layer): every valid record of `stock-quotes`, once, as Parquet in
object storage. `archiver.py` consumes and batches, `manifest.py` makes re-writes exact,
`parquet.py` is the file format and layout, `object_store.py` the storage (S3/MinIO or a local
folder), `rearchive.py` writes dead-lettered records back in."""
