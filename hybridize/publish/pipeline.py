"""`publish_to_folder` and `push`: a hybrid folder -> the folder a Hub repository gets, written locally or uploaded.

What `hybridize push` runs, callable from Python with plain arguments. `publish_to_folder` (`--dry-run DIR`) writes
the upload folder (weights, tokenizer, records, eval/bench results, remote code, model card) to a staging folder
renamed into place when complete. `push` first checks, in a second, that the Hub can be reached and a token is
there, then builds the same folder in a temporary folder that is removed whatever happens, so a failed upload leaves
no model copy behind. The token comes from the environment (HF_TOKEN) or `hf auth login`, never from an argument.
"""

import tempfile
from pathlib import Path

from huggingface_hub import constants as hub_constants

from ..atomic import OUTPUT_RECORD, check_output_folder, staged_folder
from ..errors import UserError
from ..teacher import hub_reachable
from .export import check_loadable, export_folder, parameter_count
from .model_card import render_card


def publish_to_folder(hybrid: str | Path, repo_id: str, out_dir: str | Path, *, overwrite: bool = False) -> list[str]:
    """Write the folder `push` would upload to `repo_id` (the id the model card names) to `out_dir`; return its
    files, relative to out_dir. A non-empty out_dir needs `overwrite`; the hybrid's own folder is refused."""
    check_repo_id(repo_id)
    hybrid, out_dir = Path(hybrid), Path(out_dir)
    check_loadable(hybrid)
    if out_dir.resolve() == hybrid.resolve() or out_dir.resolve() in hybrid.resolve().parents:
        raise UserError(f"{out_dir} holds the hybrid itself; pick another folder")
    check_output_folder(out_dir, overwrite=overwrite)
    with staged_folder(out_dir, replace=overwrite) as staging:
        _write_folder(hybrid, repo_id, staging)
    return sorted(str(p.relative_to(out_dir)) for p in out_dir.rglob("*") if p.is_file() and p.name != OUTPUT_RECORD)


def push(hybrid: str | Path, repo_id: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None) -> str:
    """Upload the hybrid's publish folder to the Hub repository `repo_id` (created if missing, as private when
    `private`; `revision` is a branch, created if missing); return the commit URL. Nothing is written to keep."""
    check_repo_id(repo_id)
    hybrid = Path(hybrid)
    check_loadable(hybrid)
    check_hub_ready()
    # A temporary folder (under TMPDIR), removed on success and failure alike: the upload is the only output.
    with tempfile.TemporaryDirectory(prefix="hybridize-push-") as folder:
        _write_folder(hybrid, repo_id, Path(folder))
        return upload(Path(folder), repo_id, private=private, revision=revision,
                      message=message or f"Upload {hybrid.name} with hybridize push")


def _write_folder(hybrid: Path, repo_id: str, folder: Path) -> None:
    exported = export_folder(hybrid, folder)
    card = render_card(repo_id, folder, exported["model"], parameter_count(exported["model"]))
    (folder / "README.md").write_text(card)


def check_repo_id(repo_id: str) -> None:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as err:
        raise UserError(f"repository id {repo_id!r} is not valid: {str(err).splitlines()[0]}") from None
    if "/" not in repo_id:
        raise UserError(f"repository id {repo_id!r} needs a namespace: USER/NAME or ORG/NAME")


def check_hub_ready() -> None:
    """Offline or without a token, say so at once: before minutes of export, and with nothing written."""
    from huggingface_hub import get_token

    local = "nothing written; --dry-run DIR writes the folder locally"
    if hub_constants.HF_HUB_OFFLINE or not hub_reachable():
        raise UserError(f"offline: the Hugging Face Hub cannot be reached; {local}")
    if get_token() is None:
        raise UserError(f"no Hugging Face token: set HF_TOKEN or run `hf auth login`; {local}")


def upload(folder: Path, repo_id: str, *, private: bool, revision: str | None, message: str) -> str:
    """Create the repository (and branch) if needed and upload `folder`; return the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision:
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(folder_path=folder, repo_id=repo_id, revision=revision, commit_message=message)
    except Exception as err:  # HTTP, auth and network errors come in many types; all end the same way
        raise UserError(f"upload to {repo_id} failed: {str(err).splitlines()[0]}; nothing was kept "
                        "(--dry-run DIR writes the folder locally)") from err
    return commit.commit_url
