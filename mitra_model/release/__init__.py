"""Releases in S3, the part a consumer installs (the base install: boto3, pydantic, jsonschema,
cryptography). `layout` (every key and file name), `rules` (pointer and manifest rules), `store`
(the S3 client), `objects` (the one reader of small objects), `log` (the release log), `keys`,
`signature` and `pointer` (signing), `publish` (the writer), `trust`, `local` and `transfer` (the
pull's three jobs), `pull`, `client` (the Python API)."""
