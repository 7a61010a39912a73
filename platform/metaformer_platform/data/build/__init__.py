"""Offline shard building: the builder (ImageFolder/ILSVRC -> webdataset shards), the writer, the synthetic set."""
