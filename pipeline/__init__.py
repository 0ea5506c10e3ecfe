"""Records -> labels -> frames -> embeddings -> shards (`dst labels`, `dst prepare`), the models by name, and the
shard format that training and eval read. Imports core only."""
