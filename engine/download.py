"""Fetching Hugging Face hub repos into the HF cache, with progress.

Runs in a loader thread, never on the event loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from .base import LoadProgress, ProgressCallback
from .errors import ModelSourceError, TransientLoadError


def fetch_snapshot(
    repo_id: str,
    *,
    revision: str | None,
    cache_dir: Path | None,
    allow_patterns: Sequence[str],
    report: ProgressCallback,
) -> Path:
    """Snapshot a hub repo into the cache, reporting the fraction of files fetched."""
    # Lazy: the hub client comes with transformers, takes ~80 ms to import and is needed only here.
    from huggingface_hub import snapshot_download  # noqa: PLC0415
    from huggingface_hub.errors import (  # noqa: PLC0415
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )
    from huggingface_hub.utils import tqdm as hf_tqdm  # type: ignore[attr-defined]  # noqa: PLC0415

    class _Progress(hf_tqdm):  # type: ignore[misc,unused-ignore]
        def update(self, n: float | None = 1) -> bool | None:
            out: bool | None = super().update(n)
            if self.total:
                report(LoadProgress(phase="downloading", fraction=min(1.0, self.n / self.total)))
            return out

    report(LoadProgress(phase="downloading", fraction=0.0))
    try:
        path = snapshot_download(
            repo_id,
            revision=revision,
            cache_dir=cache_dir,
            allow_patterns=list(allow_patterns),
            tqdm_class=_Progress,
        )
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as exc:
        # GatedRepoError is a RepositoryNotFoundError: structural until the operator fixes access.
        raise ModelSourceError(f"cannot download {repo_id}: {exc}") from exc
    except (LocalEntryNotFoundError, OSError) as exc:
        raise TransientLoadError(f"download of {repo_id} failed: {exc}") from exc
    report(LoadProgress(phase="downloading", fraction=1.0))
    return Path(path)
