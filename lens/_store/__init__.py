"""Report store: typed Parquet datasets, atomic writes, run manifests."""
