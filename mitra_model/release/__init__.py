"""Releases in S3, the part a consumer installs (the base install: boto3, pydantic, jsonschema,
cryptography). `layout` (every key and file name), `rules` (pointer and manifest rules), `store`
(the S3 client and its errors), `objects` (the one reader of small documents), `log` (the release
log), `keys`, `signature` and `pointer` (signing), `writes` (conditional, checked writes),
`publish` (the release protocol), `maintenance` (refresh the pointer, revert), `trust`, `local` and
`transfer` (the pull's three jobs), `pull`, `client` (the Python API)."""
