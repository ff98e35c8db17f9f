"""The `mitra-build` command (`main`: build commands; `release_commands`: ls, pull, keygen, revert,
refresh-pointer) and the local S3 server the demo and the tests use (`local_s3`)."""
