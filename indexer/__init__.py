"""The batch indexer behind `semsearch index`: files in, a versioned Milvus collection out."""
