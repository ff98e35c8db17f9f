"""Documents for people, rendered from a release's manifest: the model card (`README.md`) and the
report page (`report.html`). Publishing passes `release_documents` to `publish_build`, which lists
the documents in the manifest and signs them with the release. Needs the `[report]` extra
(matplotlib, huggingface_hub's model-card metadata); the slim client never imports it.
"""

from __future__ import annotations

from typing import Any

from mitra_model.release.layout import MODEL_CARD_NAME, REPORT_NAME
from mitra_model.report.card import model_card
from mitra_model.report.page import report_html


def release_documents(manifest: dict[str, Any], previous: dict[str, Any] | None,
                      where: str = "s3://BUCKET/PREFIX/VARIANT") -> dict[str, bytes]:
    """The documents of a release (`publish.DocumentRenderer`): file name -> bytes.

    Args:
        manifest: the release's manifest, without `documents`.
        previous: the manifest of the release before it (None for the first).
        where: the variant's URL in the store (s3://BUCKET/PREFIX/VARIANT), for the pull command.
    """
    return {MODEL_CARD_NAME: model_card(manifest, where).encode(), REPORT_NAME: report_html(manifest, previous).encode()}


__all__ = ["model_card", "release_documents", "report_html"]
